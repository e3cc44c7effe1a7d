//! `rill bench replication`: the mesh measured with real node processes on loopback.
//! - catch-up: an edge holds a backlog while its region is down; time from the region's
//!   start until it holds every message;
//! - steady state: messages produced at the edge at a fixed rate, consumed at the region;
//!   lag = consume time - publish time (one machine, one clock);
//! - wire amplification: three regions in a full mesh, each producing; UDP bytes sent on
//!   all links / payload bytes delivered to the other nodes.
use std::{collections::BTreeSet, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, bail};
use clap::Args;
use rill_replication::namespace::Edit;
use tokio::time::Instant;

use super::{ChildNode, TempDir, payloads, tempfile_in};
use crate::{
    client::{Client, ClientOptions},
    protocol::StartPosition,
};

const NAMESPACE: &str = "bench/repl";
const TOPIC: &str = "bench/repl/t";

/// How often a wait polls a node's stats.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How often a wait for a link polls (links come up in tens of milliseconds on loopback).
const LINK_POLL_EVERY: Duration = Duration::from_millis(20);
/// The longest a link may take to come up before the run fails.
const LINK_WAIT: Duration = Duration::from_secs(60);
/// The longest a catch-up (or the mesh run) may take before the run fails.
const CATCH_UP_MAX: Duration = Duration::from_secs(600);
const MESH_MAX: Duration = Duration::from_secs(300);
/// A lag run whose consumer gets nothing for this long has stalled.
const LAG_STALL: Duration = Duration::from_secs(30);
/// Time for a namespace edit to reach every node over the links before producing.
const CATALOGUE_SPREAD: Duration = Duration::from_millis(200);

/// Flags of `rill bench replication`.
#[derive(Debug, Args)]
pub(crate) struct ReplicationArgs {
    /// Backlog of the catch-up run, messages.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Rate of the steady-state run, messages per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Duration of the steady-state run, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Messages each region produces in the amplification run.
    #[arg(long, default_value_t = 100_000)]
    mesh_messages: u64,
    /// Directory for scratch data (the disk being measured).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
}

/// A set of nodes sharing one CA, each with its own config and data dir.
struct Bench {
    scratch: TempDir,
    addrs: Vec<(String, SocketAddr)>,
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

impl Bench {
    fn new(dir: &Path, names: &[&str]) -> anyhow::Result<Bench> {
        let scratch = tempfile_in(dir)?;
        let certs = scratch.path().join("certs");
        rill_transport::certs::create_mesh(&certs, names)?;
        let addrs = names.iter().map(|n| Ok((n.to_string(), free_addr()?))).collect::<anyhow::Result<_>>()?;
        Ok(Bench { scratch, addrs })
    }

    fn addr(&self, name: &str) -> SocketAddr {
        self.addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a).expect("a configured node")
    }

    fn options(&self, name: &str) -> ClientOptions {
        ClientOptions::new(self.addr(name), self.scratch.path().join("certs"))
    }

    /// Starts `name`, dialing the peers in `dials` and accepting those in `accepts`.
    fn start(&self, name: &str, dials: &[&str], accepts: &[&str]) -> anyhow::Result<ChildNode> {
        let certs = self.scratch.path().join("certs");
        let mut config = format!(
            "name = \"{name}\"\nlisten = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.addr(name),
            certs.join("ca.pem").display(),
            certs.join(format!("{name}.pem")).display(),
            certs.join(format!("{name}.key")).display()
        );
        for p in dials {
            config.push_str(&format!("[[peers]]\nname = \"{p}\"\naddr = \"{}\"\n", self.addr(p)));
        }
        for p in accepts {
            config.push_str(&format!("[[peers]]\nname = \"{p}\"\n"));
        }
        let path = self.scratch.path().join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        let data = tempfile_in(self.scratch.path())?;
        let path = path.to_str().context("utf-8 path")?.to_string();
        ChildNode::start_with(data, &["--config", &path])
    }
}

async fn end_offset(options: &ClientOptions) -> anyhow::Result<u64> {
    let client = Client::connect(options).await?;
    let stats = client.stats().await?;
    client.close().await;
    Ok(stats.topics.iter().find(|t| t.topic == TOPIC).map_or(0, |t| t.end_offset))
}

async fn wait_for(options: &ClientOptions, want: u64, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while end_offset(options).await.unwrap_or(0) < want {
        if started.elapsed() > limit {
            bail!("{} did not reach {want} messages within {}s", options.addr, limit.as_secs());
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    Ok(started.elapsed())
}

/// Waits until `options`' node reports its link to `peer` up; returns how long it took.
async fn wait_linked(options: &ClientOptions, peer: &str, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(client) = Client::connect(options).await {
            let up = client.stats().await.is_ok_and(|s| s.peers.iter().any(|p| p.name == peer && p.connected));
            client.close().await;
            if up {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > limit {
            bail!("{} did not link to {peer} within {}s", options.addr, limit.as_secs());
        }
        tokio::time::sleep(LINK_POLL_EVERY).await;
    }
}

async fn create_namespace(options: &ClientOptions, clusters: &[&str]) -> anyhow::Result<()> {
    let client = Client::connect(options).await?;
    client.ns_edit(NAMESPACE, Edit::Create).await?;
    let set = clusters.iter().map(|s| rill_storage::NodeName::parse(s)).collect::<Result<BTreeSet<_>, _>>()?;
    client.ns_edit(NAMESPACE, Edit::SetClusters(set)).await?;
    client.close().await;
    Ok(())
}

/// Produces `count` messages as fast as acks allow; returns msgs/s.
async fn produce(options: &ClientOptions, producer: &str, count: u64, size: usize) -> anyhow::Result<f64> {
    let client = Client::connect(options).await?;
    let mut p = client.producer(TOPIC, producer.into()).await?;
    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        while p.in_flight() >= 16 {
            p.next_ack().await?;
        }
        let n = 1000.min(count - sent);
        p.send(payloads(n as usize, size)).await?;
        sent += n;
    }
    p.flush().await?;
    client.close().await;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Steady state runs first: the catch-up's half a gigabyte of scratch data is deleted
/// when it ends, and that disk work would land in the lag figures.
pub(crate) async fn run(a: ReplicationArgs) -> anyhow::Result<()> {
    // Start from a quiet disk: writeback left by earlier work (a previous run's half a
    // gigabyte) stalls fsyncs for tens of milliseconds and would land in the lag tail.
    let _ = std::process::Command::new("sync").status();
    steady_state(&a).await?;
    amplification(&a).await?;
    catch_up(&a).await
}

async fn catch_up(a: &ReplicationArgs) -> anyhow::Result<()> {
    let bench = Bench::new(&a.dir, &["edge", "region"])?;
    let _edge = bench.start("edge", &["region"], &[])?;
    create_namespace(&bench.options("edge"), &["edge", "region"]).await?;
    eprintln!("bench replication: catch-up of {} x {} B", a.messages, a.size);
    let local_rate = produce(&bench.options("edge"), "backlog", a.messages, a.size).await?;
    let started = Instant::now();
    let _region = bench.start("region", &[], &["edge"])?;
    let linked = wait_linked(&bench.options("edge"), "region", LINK_WAIT).await?;
    let link_up = Instant::now();
    wait_for(&bench.options("region"), a.messages, CATCH_UP_MAX).await?;
    let took = link_up.elapsed();
    let mb = (a.messages * a.size as u64) as f64 / 1e6;
    println!(
        "replication catch-up: {} msgs ({mb:.0} MB payload) in {:.2}s from link up = {:.1} MB/s (target >= 100 MB/s); \
         link up {:.2}s after the region started (process start + the edge's dial backoff), {:.2}s in all; \
         local durable produce in the same run: {:.1} MB/s",
        a.messages,
        took.as_secs_f64(),
        mb / took.as_secs_f64(),
        linked.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        local_rate * a.size as f64 / 1e6
    );
    Ok(())
}

async fn steady_state(a: &ReplicationArgs) -> anyhow::Result<()> {
    let bench = Bench::new(&a.dir, &["edge", "region"])?;
    let _edge = bench.start("edge", &["region"], &[])?;
    let _region = bench.start("region", &[], &["edge"])?;
    create_namespace(&bench.options("edge"), &["edge", "region"]).await?;
    wait_linked(&bench.options("edge"), "region", LINK_WAIT).await?;
    let region = Client::connect(&bench.options("region")).await?;
    let mut consumer = region.subscribe(TOPIC, "lag", StartPosition::Earliest).await?;
    let edge = Client::connect(&bench.options("edge")).await?;
    let mut p = edge.producer(TOPIC, "steady".into()).await?;
    let per_ms = (a.rate / 1000).max(1) as usize;
    let total = a.seconds * 1000 * per_ms as u64;
    eprintln!("bench replication: steady state, {} msgs/s for {}s", per_ms * 1000, a.seconds);
    let producing = async {
        let start = Instant::now();
        for i in 0..a.seconds * 1000 {
            tokio::time::sleep_until(start + Duration::from_millis(i)).await;
            while p.in_flight() > 0 {
                match tokio::time::timeout(Duration::ZERO, p.next_ack()).await {
                    Ok(ack) => drop(ack?),
                    Err(_) => break,
                }
            }
            p.send(payloads(per_ms, a.size)).await?;
        }
        p.flush().await?;
        anyhow::Ok(())
    };
    let consuming = async {
        let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
        let clock = crate::env::SystemClock;
        for _ in 0..total {
            let m = tokio::time::timeout(LAG_STALL, consumer.next()).await.context("lag run stalled")??;
            let m = m.context("subscription closed")?;
            let now = crate::env::Clock::now_ms(&clock);
            hist.record(now.saturating_sub(m.message.publish_time_ms))?;
            consumer.ack(m.offset);
        }
        anyhow::Ok(hist)
    };
    let (produced, hist) = tokio::join!(producing, consuming);
    produced?;
    let hist = hist?;
    println!(
        "replication lag at {} msgs/s (publish at edge -> delivered at region): p50 {} ms, p99 {} ms, max {} ms (target p99 <= 10 ms)",
        per_ms * 1000,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    Ok(())
}

async fn amplification(a: &ReplicationArgs) -> anyhow::Result<()> {
    let names = ["r1", "r2", "r3"];
    let bench = Bench::new(&a.dir, &names)?;
    let nodes = [
        bench.start("r1", &["r2", "r3"], &[])?,
        bench.start("r2", &["r1", "r3"], &[])?,
        bench.start("r3", &["r1", "r2"], &[])?,
    ];
    create_namespace(&bench.options("r1"), &names).await?;
    for (n, peer) in [("r1", "r2"), ("r1", "r3"), ("r2", "r3")] {
        wait_linked(&bench.options(n), peer, LINK_WAIT).await?;
    }
    tokio::time::sleep(CATALOGUE_SPREAD).await;
    eprintln!("bench replication: full mesh of 3, {} x {} B produced at each", a.mesh_messages, a.size);
    let (o1, o2, o3) = (bench.options("r1"), bench.options("r2"), bench.options("r3"));
    let (x, y, z) = tokio::join!(
        produce(&o1, "at-r1", a.mesh_messages, a.size),
        produce(&o2, "at-r2", a.mesh_messages, a.size),
        produce(&o3, "at-r3", a.mesh_messages, a.size)
    );
    x?;
    y?;
    z?;
    for n in names {
        wait_for(&bench.options(n), 3 * a.mesh_messages, MESH_MAX).await?;
    }
    let mut link_bytes = 0;
    let mut dedup = 0;
    for n in names {
        let client = Client::connect(&bench.options(n)).await?;
        let stats = client.stats().await?;
        client.close().await;
        link_bytes += stats.peers.iter().map(|p| p.link_bytes_sent).sum::<u64>();
        dedup += stats.peers.iter().flat_map(|p| p.lanes.iter().map(|l| l.deduplicated)).sum::<u64>();
    }
    // Each message must reach the two other regions.
    let delivered = 3 * a.mesh_messages * a.size as u64 * 2;
    let downs: Vec<String> = nodes
        .iter()
        .flat_map(|n| {
            n.log()
                .lines()
                .filter(|l| l.contains("peer link down") || l.contains("peer link replaced"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    println!(
        "replication wire amplification, full mesh of 3: {link_bytes} link bytes / {delivered} payload bytes delivered = {:.2} \
         (target <= 1.2); {dedup} copies arrived twice and were dropped by dedup; links went down or were replaced {} time(s)",
        link_bytes as f64 / delivered as f64,
        downs.len()
    );
    for d in downs.iter().take(6) {
        eprintln!("  {d}");
    }
    Ok(())
}
