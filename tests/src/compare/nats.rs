//! NATS JetStream's side: a leaf node with JetStream (domain `edge`) in the edge namespace
//! and a hub with JetStream (domain `cloud`) in the cloud namespace, whose stream mirrors
//! the edge's; or a lone server for the produce runs.
use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use async_nats::jetstream::{self, stream};

use crate::{
    netns,
    procs::{Server, wait_until},
};

pub(crate) const EDGE_STREAM: &str = "EDGE";
const CLOUD_STREAM: &str = "CLOUD";
pub(crate) const SUBJECT: &str = "bench.t";
const EDGE_URL: &str = "nats://127.0.0.1:4222";

/// When JetStream fsyncs: on every write, or its default (every two minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sync {
    Always,
    Default,
}

/// One deployment.
pub(crate) struct Nats {
    pub(crate) edge: Server,
    cloud: Option<Server>,
}

fn jetstream_block(dir: &Path, name: &str, sync: Sync) -> String {
    let sync = match sync {
        Sync::Always => "\n  sync_interval: always",
        Sync::Default => "",
    };
    format!("jetstream {{\n  store_dir: \"{}\"\n  domain: {name}{sync}\n}}\n", dir.join(format!("{name}-js")).display())
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, text)?;
    Ok(path)
}

async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::connect(url).await.with_context(|| format!("connecting to {url}"))
}

pub(crate) fn cloud_url() -> String {
    format!("nats://{}:4222", netns::CLOUD_MGMT_IP)
}

impl Nats {
    /// Starts the edge server (a leaf of the cloud if `with_cloud`) and the cloud hub;
    /// creates the edge stream and, with a cloud, the mirror of it there.
    pub(crate) async fn start(bin: &Path, dir: &Path, sync: Sync, with_cloud: bool) -> anyhow::Result<Nats> {
        let mut edge_conf =
            format!("server_name: edge\nlisten: \"127.0.0.1:4222\"\n{}", jetstream_block(dir, "edge", sync));
        if with_cloud {
            edge_conf.push_str(&format!(
                "leafnodes {{\n  remotes: [ {{ url: \"nats-leaf://{}:7422\" }} ]\n}}\n",
                netns::CLOUD_UPLINK_IP
            ));
        }
        let mut command = Command::new(bin);
        command.arg("-c").arg(write(dir, "nats-edge", &edge_conf)?);
        let edge = Server::start("nats-edge", command, dir)?;
        let cloud = if with_cloud {
            let conf = format!(
                "server_name: cloud\nlisten: \"0.0.0.0:4222\"\n{}leafnodes {{\n  listen: \"0.0.0.0:7422\"\n}}\n",
                jetstream_block(dir, "cloud", sync)
            );
            let mut command = netns::in_cloud(bin);
            command.arg("-c").arg(write(dir, "nats-cloud", &conf)?);
            Some(Server::start("nats-cloud", command, dir)?)
        } else {
            None
        };
        let mut nats = Nats { edge, cloud };
        let mut urls = vec![EDGE_URL.to_string()];
        if with_cloud {
            urls.push(cloud_url());
        }
        for url in &urls {
            let ready = wait_until(&format!("nats {url} answering"), Duration::from_secs(20), || async {
                async_nats::connect(url.as_str()).await.is_ok()
            })
            .await;
            if let Err(e) = ready {
                nats.edge.check_running()?;
                if let Some(c) = &mut nats.cloud {
                    c.check_running()?;
                }
                return Err(e);
            }
        }
        let edge = jetstream::new(connect(EDGE_URL).await?);
        let config = stream::Config {
            name: EDGE_STREAM.into(),
            subjects: vec![SUBJECT.into()],
            storage: stream::StorageType::File,
            ..Default::default()
        };
        create(&edge, config).await?;
        if with_cloud {
            let cloud = jetstream::new(connect(&cloud_url()).await?);
            // The edge's JetStream API, reached through the leaf connection by its domain.
            let external = stream::External { api_prefix: "$JS.edge.API".into(), delivery_prefix: None };
            let mirror = stream::Source { name: EDGE_STREAM.into(), external: Some(external), ..Default::default() };
            let config = stream::Config {
                name: CLOUD_STREAM.into(),
                storage: stream::StorageType::File,
                mirror: Some(mirror),
                ..Default::default()
            };
            create(&cloud, config).await?;
        }
        Ok(nats)
    }
}

async fn create(js: &jetstream::Context, config: stream::Config) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        match js.create_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            // JetStream may need a moment after the port opens (and the leaf to connect).
            Err(_) if started.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => bail!("creating stream {}: {e}", config.name),
        }
    }
}

/// Messages a stream holds.
pub(crate) async fn count(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    let mut s = js.get_stream(stream).await.map_err(|e| anyhow!("stream {stream}: {e}"))?;
    Ok(s.info().await.map_err(|e| anyhow!("stream {stream} info: {e}"))?.state.messages)
}

pub(crate) async fn edge() -> anyhow::Result<jetstream::Context> {
    Ok(jetstream::new(connect(EDGE_URL).await?))
}

pub(crate) async fn cloud() -> anyhow::Result<jetstream::Context> {
    Ok(jetstream::new(connect(&cloud_url()).await?))
}

pub(crate) const CLOUD: &str = CLOUD_STREAM;

/// One pipelined publisher: up to `messages` (or until `limit` passes) with `window`
/// acknowledgements outstanding; answers (acknowledged, seconds).
pub(crate) async fn produce(messages: u64, limit: Duration, size: usize, window: usize) -> anyhow::Result<(u64, f64)> {
    let js = edge().await?;
    let payload = vec![0x5au8; size];
    let started = Instant::now();
    let (mut sent, mut acked) = (0u64, 0u64);
    let mut pending = VecDeque::with_capacity(window);
    while sent < messages && started.elapsed() < limit {
        while pending.len() >= window {
            let ack: jetstream::context::PublishAckFuture = pending.pop_front().expect("not empty");
            ack.await.map_err(|e| anyhow!("publish ack: {e}"))?;
            acked += 1;
        }
        pending.push_back(js.publish(SUBJECT, payload.clone().into()).await.map_err(|e| anyhow!("publish: {e}"))?);
        sent += 1;
    }
    for ack in pending {
        ack.await.map_err(|e| anyhow!("publish ack: {e}"))?;
        acked += 1;
    }
    Ok((acked, started.elapsed().as_secs_f64()))
}

/// Publishes `rate` messages a second, a burst every 10 ms, until `stop`.
pub(crate) async fn steady(rate: u64, size: usize, stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<u64> {
    let js = edge().await?;
    let payload = vec![0x5au8; size];
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut pending = VecDeque::new();
    let mut acked = 0;
    while !*stop.borrow() {
        tick.tick().await;
        while pending.len() > 640 {
            let ack: jetstream::context::PublishAckFuture = pending.pop_front().expect("not empty");
            ack.await.map_err(|e| anyhow!("publish ack: {e}"))?;
            acked += 1;
        }
        for _ in 0..per_tick {
            pending.push_back(js.publish(SUBJECT, payload.clone().into()).await.map_err(|e| anyhow!("publish: {e}"))?);
        }
    }
    for ack in pending {
        ack.await.map_err(|e| anyhow!("publish ack: {e}"))?;
        acked += 1;
    }
    Ok(acked)
}
