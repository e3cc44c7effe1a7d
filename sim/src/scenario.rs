//! A scenario harness: nodes on turmoil hosts, a client workload, and faults on a timeline.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use rill_node::{
    Node,
    client::{Client, ClientOptions, Outgoing},
    config::{NodeConfig, PeerConfig, TlsConfig},
    protocol::StartPosition,
};
use rill_replication::namespace::Edit;
use rill_storage::meta::MemMeta;

use crate::{env::sim_env, net::SimNet, net::Trace};

/// Client port of every simulated node.
const PORT: u16 = 7400;
/// The simulation's wall clock starts here (2030-01-01), far from the real clock.
const EPOCH_S: u64 = 1_893_456_000;
const TOPIC: &str = "acme/sensors/temp";

/// What a run produced and observed.
#[derive(Debug)]
pub struct Outcome {
    /// Hash of every datagram's time, addresses and length.
    pub trace_hash: u64,
    /// Datagrams sent.
    pub datagrams: usize,
    /// Seqs the producer saw acknowledged.
    pub acked: BTreeSet<u64>,
    /// Seqs the region holds, in its log order.
    pub region_seqs: Vec<u64>,
    /// Host boots (a restart counts again).
    pub boots: u64,
    /// Simulated time the run took.
    pub simulated: Duration,
}

fn certs() -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    rill_transport::certs::create_ca(&certs)?;
    for n in ["edge", "region"] {
        rill_transport::certs::issue_node(&certs, n)?;
    }
    rill_transport::certs::issue_client(&certs)?;
    Ok((dir, certs))
}

fn config(name: &str, certs: &std::path::Path, peer: &str, dial: Option<SocketAddr>) -> NodeConfig {
    NodeConfig {
        name: Some(name.into()),
        data_dir: PathBuf::from("/data"),
        listen: (std::net::Ipv4Addr::UNSPECIFIED, PORT).into(),
        tls: TlsConfig {
            ca: Some(certs.join("ca.pem")),
            cert: Some(certs.join(format!("{name}.pem"))),
            key: Some(certs.join(format!("{name}.key"))),
        },
        peers: vec![PeerConfig { name: peer.into(), addr: dial }],
        ..NodeConfig::default()
    }
}

fn addr(host: &str) -> SocketAddr {
    (turmoil::lookup(host), PORT).into()
}

/// Edge and region, the edge partitioned from the region at first. The client produces at
/// the edge; the edge is crashed (losing unsynced writes) and restarted mid-workload; the
/// partition heals; the client then reads everything back at the region.
pub fn edge_crash_and_partition(seed: u64) -> anyhow::Result<Outcome> {
    let (_dir, certs) = certs()?;
    let trace = Arc::new(Trace::default());
    let mut builder = turmoil::Builder::new();
    builder
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S))
        .simulation_duration(Duration::from_secs(600));
    let mut sim = builder.build();
    let metas: BTreeMap<&str, Arc<MemMeta>> = ["edge", "region"].into_iter().map(|n| (n, Arc::default())).collect();
    let boots = Arc::new(Mutex::new(0u64));
    for (name, peer, dials) in [("edge", "region", true), ("region", "edge", false)] {
        let (meta, trace, certs, boots) =
            (Arc::clone(&metas[name]), Arc::clone(&trace), certs.clone(), Arc::clone(&boots));
        sim.host(name, move || {
            let (meta, trace, certs, boots) =
                (Arc::clone(&meta), Arc::clone(&trace), certs.clone(), Arc::clone(&boots));
            async move {
                let boot = {
                    let mut b = boots.lock().expect("boots");
                    *b += 1;
                    *b
                };
                let env = sim_env(seed.wrapping_mul(31).wrapping_add(boot), meta, trace);
                let node = Node::start(config(name, &certs, peer, dials.then(|| addr(peer))), env).await?;
                let _node = node;
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    sim.partition("edge", "region");

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let region_seqs = Arc::new(Mutex::new(Vec::new()));
    let produced_all = Arc::new(Mutex::new(false));
    {
        let (acked, region_seqs, produced_all, certs, trace) = (
            Arc::clone(&acked),
            Arc::clone(&region_seqs),
            Arc::clone(&produced_all),
            certs.clone(),
            Arc::clone(&trace),
        );
        sim.client("client", async move {
            let net = SimNet::new(seed ^ 0xc11e, trace);
            workload(&net, &certs, &acked, &produced_all).await?;
            let total = acked.lock().expect("acked").len() as u64;
            read_back(&net, &certs, total, &region_seqs).await?;
            Ok(())
        });
    }
    run(&mut sim, &metas, &produced_all)?;
    let simulated = sim.elapsed();
    let acked = acked.lock().expect("acked").clone();
    let region_seqs = region_seqs.lock().expect("seqs").clone();
    let boots = *boots.lock().expect("boots");
    Ok(Outcome { trace_hash: trace.hash(), datagrams: trace.len(), acked, region_seqs, boots, simulated })
}

/// Steps the simulation, injecting the faults: crash and restart the edge at 3 s, heal
/// the partition once the producer is done.
fn run(sim: &mut turmoil::Sim, metas: &BTreeMap<&str, Arc<MemMeta>>, produced_all: &Mutex<bool>) -> anyhow::Result<()> {
    let (mut crashed, mut healed) = (false, false);
    loop {
        let elapsed = sim.elapsed();
        if !crashed && elapsed >= Duration::from_secs(3) {
            sim.crash("edge");
            metas["edge"].crash();
            sim.bounce("edge");
            crashed = true;
        }
        if !healed && crashed && *produced_all.lock().expect("flag") {
            sim.repair("edge", "region");
            healed = true;
        }
        if sim.step().map_err(|e| anyhow::anyhow!("{e}"))? {
            return Ok(());
        }
    }
}

async fn connect(net: &SimNet, certs: &std::path::Path, host: &str) -> Option<Client> {
    Client::connect_with(net, &ClientOptions::new(addr(host), certs)).await.ok()
}

/// Creates the namespace and produces 20 batches of 10 at the edge, resending after
/// failures (the edge crashes in the middle); records what was acknowledged.
async fn workload(
    net: &SimNet,
    certs: &std::path::Path,
    acked: &Mutex<BTreeSet<u64>>,
    produced_all: &Mutex<bool>,
) -> anyhow::Result<()> {
    let client = loop {
        if let Some(c) = connect(net, certs, "edge").await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    client.ns_edit("acme/sensors", Edit::Create).await?;
    client.ns_edit("acme/sensors", Edit::SetClusters(["edge".into(), "region".into()].into())).await?;
    let mut client = client;
    let mut producer = client.producer(TOPIC, "sensor".into()).await?;
    for batch in 0..20u64 {
        let messages = (0..10).map(|i| Outgoing::payload(format!("m{}", batch * 10 + i))).collect();
        producer.send(messages).await.ok();
        loop {
            match producer.flush().await {
                Ok(acks) => {
                    for a in acks {
                        acked.lock().expect("acked").extend(a.first_seq..a.first_seq + a.results.len() as u64);
                    }
                    break;
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Some(c) = connect(net, certs, "edge").await {
                        client = c;
                        let _ = producer.resume(&client).await;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    *produced_all.lock().expect("flag") = true;
    Ok(())
}

/// Simulated time the read-back waits for the region to catch up before reading what it
/// has, so that a loss shows as missing seqs rather than as a timeout.
const CATCH_UP_WAIT: Duration = Duration::from_secs(120);

/// Waits until the region holds `total` messages (or [`CATCH_UP_WAIT`] passes), then reads
/// them in log order.
async fn read_back(net: &SimNet, certs: &std::path::Path, total: u64, seqs: &Mutex<Vec<u64>>) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
    loop {
        if let Some(c) = connect(net, certs, "region").await {
            let end = c.stats().await?.topics.iter().find(|t| t.topic == TOPIC).map_or(0, |t| t.end_offset);
            if end >= total || tokio::time::Instant::now() >= deadline {
                let mut consumer = c.subscribe(TOPIC, "check", StartPosition::Earliest).await?;
                for _ in 0..end {
                    let m = consumer.next().await?.ok_or_else(|| anyhow::anyhow!("subscription closed"))?;
                    seqs.lock().expect("seqs").push(m.message.id.seq);
                    consumer.ack(m.offset);
                }
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_messages_survive_a_crash_and_a_partition_exactly_once_in_order() {
        let out = edge_crash_and_partition(7).unwrap();
        eprintln!("{out:?}");
        assert_eq!(out.boots, 3, "edge booted twice (crash and restart), region once");
        assert_eq!(out.acked.len(), 200, "the workload ends with every batch acknowledged");
        let expected: Vec<u64> = (0..200).collect();
        assert_eq!(out.region_seqs, expected, "the region holds each acked message once, in order");
    }

    #[test]
    fn a_seed_replays_identically() {
        let a = edge_crash_and_partition(11).unwrap();
        let b = edge_crash_and_partition(11).unwrap();
        assert!(a.datagrams > 100, "traffic flowed: {}", a.datagrams);
        assert_eq!((a.trace_hash, a.datagrams), (b.trace_hash, b.datagrams));
    }
}
