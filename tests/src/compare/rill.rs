//! rill's side: an edge node (in the edge namespace) and a cloud node (in the cloud
//! namespace) replicating one namespace, or a lone node for the produce runs.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;
use rill_node::client::{Client, ClientOptions, Outgoing};
use rill_replication::namespace::Edit;

use crate::{
    netns,
    procs::{Server, wait_until},
};

const NAMESPACE: &str = "bench/cmp";
pub(crate) const TOPIC: &str = "bench/cmp/t";
const PORT: u16 = 7400;

/// One deployment, removed with its data when dropped.
pub(crate) struct Rill {
    pub(crate) edge: Server,
    cloud: Option<Server>,
    certs: PathBuf,
}

fn config(dir: &Path, certs: &Path, name: &str, peer: Option<(&str, Option<&str>)>) -> anyhow::Result<PathBuf> {
    let mut text = format!(
        "name = \"{name}\"\ndata_dir = \"{}\"\nlisten = \"0.0.0.0:{PORT}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join(format!("{name}-data")).display(),
        certs.join("ca.pem").display(),
        certs.join(format!("{name}.pem")).display(),
        certs.join(format!("{name}.key")).display()
    );
    if let Some((peer, addr)) = peer {
        text.push_str(&format!("[[peers]]\nname = \"{peer}\"\n"));
        if let Some(addr) = addr {
            text.push_str(&format!("addr = \"{addr}:{PORT}\"\n"));
        }
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

impl Rill {
    /// Starts the edge node, and the cloud node if `with_cloud`; waits until they answer.
    pub(crate) async fn start(bin: &Path, dir: &Path, with_cloud: bool) -> anyhow::Result<Rill> {
        let certs = dir.join("certs");
        rill_transport::certs::create_mesh(&certs, &["edge", "cloud"])?;
        let uplink = with_cloud.then_some(("cloud", Some(netns::CLOUD_UPLINK_IP)));
        let edge_config = config(dir, &certs, "edge", uplink)?;
        let mut command = Command::new(bin);
        command.args(["node", "run", "--config"]).arg(&edge_config);
        let edge = Server::start("rill-edge", command, dir)?;
        let cloud = if with_cloud {
            let cloud_config = config(dir, &certs, "cloud", Some(("edge", None)))?;
            let mut command = netns::in_cloud(bin);
            command.args(["node", "run", "--config"]).arg(&cloud_config);
            Some(Server::start("rill-cloud", command, dir)?)
        } else {
            None
        };
        let mut rill = Rill { edge, cloud, certs };
        for (options, server) in [(rill.edge_options(), "edge"), (rill.cloud_options(), "cloud")] {
            if server == "cloud" && rill.cloud.is_none() {
                continue;
            }
            let ready = wait_until(&format!("rill {server} answering"), Duration::from_secs(20), || {
                let options = options.clone();
                async move { Client::connect(&options).await.is_ok() }
            })
            .await;
            if let Err(e) = ready {
                rill.edge.check_running()?;
                if let Some(c) = &mut rill.cloud {
                    c.check_running()?;
                }
                return Err(e);
            }
        }
        if with_cloud {
            let client = Client::connect(&rill.edge_options()).await?;
            client.ns_edit(NAMESPACE, Edit::Create).await?;
            let clusters: BTreeSet<rill_storage::NodeName> =
                ["edge", "cloud"].iter().map(|s| rill_storage::NodeName::parse(s)).collect::<Result<_, _>>()?;
            client.ns_edit(NAMESPACE, Edit::SetClusters(clusters)).await?;
        }
        Ok(rill)
    }

    pub(crate) fn edge_options(&self) -> ClientOptions {
        ClientOptions::new(SocketAddr::from(([127, 0, 0, 1], PORT)), &self.certs)
    }

    pub(crate) fn cloud_options(&self) -> ClientOptions {
        let ip: std::net::IpAddr = netns::CLOUD_MGMT_IP.parse().expect("an address");
        ClientOptions::new(SocketAddr::new(ip, PORT), &self.certs)
    }
}

/// Messages of the topic a client's node holds.
pub(crate) async fn count(client: &Client) -> anyhow::Result<u64> {
    let stats = client.stats().await?;
    Ok(stats.topics.iter().find(|t| t.topic == TOPIC).map_or(0, |t| t.end_offset - t.start_offset))
}

fn batch(n: usize, size: usize) -> Vec<Outgoing> {
    (0..n).map(|_| Outgoing::payload(vec![0x5a; size])).collect()
}

/// One pipelined producer: up to `messages` (or until `limit` passes) in batches of
/// `batch_len` with `window` batches in flight; answers (acknowledged, seconds).
pub(crate) async fn produce(
    options: &ClientOptions,
    topic: &str,
    messages: u64,
    limit: Duration,
    size: usize,
    (batch_len, window): (usize, usize),
) -> anyhow::Result<(u64, f64)> {
    let client = Client::connect(options).await?;
    let mut p = client.producer(topic, "bench".into()).await?;
    let started = Instant::now();
    let (mut sent, mut acked) = (0u64, 0u64);
    while sent < messages && started.elapsed() < limit {
        while p.in_flight() >= window {
            acked += p.next_ack().await?.results.len() as u64;
        }
        let n = (batch_len as u64).min(messages - sent) as usize;
        p.send(batch(n, size)).await?;
        sent += n as u64;
    }
    for ack in p.flush().await? {
        acked += ack.results.len() as u64;
    }
    Ok((acked, started.elapsed().as_secs_f64()))
}

/// Produces `rate` messages a second, a batch every 10 ms, until `stop`.
pub(crate) async fn steady(
    options: ClientOptions,
    rate: u64,
    size: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let client = Client::connect(&options).await?;
    let mut p = client.producer(TOPIC, "steady".into()).await?;
    let per_tick = (rate / 100).max(1) as usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut acked = 0;
    while !*stop.borrow() {
        tick.tick().await;
        while p.in_flight() > 64 {
            acked += p.next_ack().await?.results.len() as u64;
        }
        p.send(batch(per_tick, size)).await?;
    }
    for ack in p.flush().await? {
        acked += ack.results.len() as u64;
    }
    Ok(acked)
}

/// A connection for polling a node's count, made once.
pub(crate) async fn connect(options: &ClientOptions) -> anyhow::Result<Client> {
    Client::connect(options).await.with_context(|| format!("connecting to {}", options.addr))
}
