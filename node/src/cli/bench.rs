//! `rill bench`: benchmarks that print figures, each against a baseline measured in the
//! same run because these machines are noisy. Not tests: nothing here asserts.
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use rill_storage::{
    Message, MessageId, ProducerId, TopicName,
    fs::StdFs,
    log::LogConfig,
    meta::MemMeta,
    topic::{OnConflict, TopicStore, commit_group},
};
use tokio::time::Instant;

use crate::client::{Client, ClientOptions, Outgoing};

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Log append with one fdatasync per batch, against raw append + fdatasync.
    Storage(StorageArgs),
    /// Produce over QUIC on loopback to a node in a child process: throughput with one
    /// pipelined producer, and ack latency at a fixed rate.
    Produce(ProduceArgs),
    /// Resident memory of an idle node holding many topics.
    Rss(RssArgs),
    /// Replication: backlog catch-up, steady-state lag, wire amplification.
    Replication(super::bench_mesh::ReplicationArgs),
    /// A Shared subscription with several consumers draining a backlog, one ack per
    /// message; the size of the ack state after.
    Subscriptions(super::bench_subs::SubscriptionArgs),
    /// The metadata store: flush latency (puts then one flush, as a checkpoint does) and
    /// reopen time of the metadata log, against sled (which it replaced) on the same disk.
    Meta(MetaArgs),
}

/// Flags of `rill bench meta`.
#[derive(Debug, Args)]
pub(crate) struct MetaArgs {
    /// Directory on the disk to measure (a scratch dir inside it is removed after).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// Flushes per store.
    #[arg(long, default_value_t = 2000)]
    flushes: usize,
    /// Puts before each flush (of 200-byte values, over 500 keys).
    #[arg(long, default_value_t = 20)]
    puts: usize,
}

/// `rill bench meta`.
fn meta(a: MetaArgs) -> anyhow::Result<()> {
    use rill_storage::{
        meta::{MetaStore, SledMeta},
        metalog::LogMeta,
    };
    let scratch = tempfile_in(&a.dir)?;
    let value = vec![0x5a; 200];
    let run = |store: &dyn MetaStore| -> anyhow::Result<(u64, u64)> {
        let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
        for f in 0..a.flushes {
            for p in 0..a.puts {
                store.put(&format!("sub/t/n/x/s{}", (f * a.puts + p) % 500), &value)?;
            }
            let started = std::time::Instant::now();
            store.flush()?;
            hist.record(started.elapsed().as_micros() as u64)?;
        }
        Ok((hist.value_at_quantile(0.5), hist.value_at_quantile(0.99)))
    };
    let log_path = scratch.path().join("meta.log");
    let sled_path = scratch.path().join("meta");
    let (log_p50, log_p99) = run(&LogMeta::open(&log_path)?)?;
    let (sled_p50, sled_p99) = run(&SledMeta::open(&sled_path)?)?;
    let reopen = |f: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let started = std::time::Instant::now();
        f()?;
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    };
    let log_open = reopen(&|| LogMeta::open(&log_path).map(drop).map_err(Into::into))?;
    let sled_open = reopen(&|| SledMeta::open(&sled_path).map(drop).map_err(Into::into))?;
    println!("{} flushes of {} puts each:", a.flushes, a.puts);
    println!("  metadata log  flush p50 {log_p50} us, p99 {log_p99} us, reopen {log_open:.1} ms");
    println!("  sled          flush p50 {sled_p50} us, p99 {sled_p99} us, reopen {sled_open:.1} ms");
    println!("(sled's flush leaves its store unsynced: see the power-cut test sled_leaves_a_flushed_entry_unsynced)");
    Ok(())
}

pub(crate) async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Storage(a) => storage(a).await,
        BenchCommand::Produce(a) => produce(a).await,
        BenchCommand::Rss(a) => rss(a).await,
        BenchCommand::Replication(a) => super::bench_mesh::run(a).await,
        BenchCommand::Subscriptions(a) => super::bench_subs::run(a).await,
        BenchCommand::Meta(a) => meta(a),
    }
}

/// Flags of `rill bench storage`.
#[derive(Debug, Args)]
pub(crate) struct StorageArgs {
    /// Directory on the disk to measure (a scratch dir inside it is removed after).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// Batches per run.
    #[arg(long, default_value_t = 200)]
    batches: usize,
    /// Messages per batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Rounds of (raw, rill), alternating.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The baseline: the same payload bytes appended with one fdatasync per batch. Each batch
/// is its own buffer, built before the clock starts, as the log's batches are: rewriting
/// one buffer would keep it in the CPU cache and flatter the baseline.
fn raw_append(dir: &Path, a: &StorageArgs) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("raw.bin");
    let mut f = std::fs::File::create(&path)?;
    let chunks: Vec<Vec<u8>> = (0..a.batches).map(|b| vec![b as u8; a.batch * a.size]).collect();
    let started = std::time::Instant::now();
    for chunk in &chunks {
        f.write_all(chunk)?;
        f.sync_data()?;
    }
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok((a.batches * a.batch * a.size) as f64 / secs / 1e6)
}

fn rill_append(dir: &Path, a: &StorageArgs, round: usize) -> anyhow::Result<f64> {
    let root = dir.join(format!("rill-{round}"));
    let meta = MemMeta::default();
    let topic = TopicName::parse("bench/storage/t")?;
    let store = Mutex::new(TopicStore::open(Arc::new(StdFs), &meta, &root, topic, LogConfig::default())?);
    // Shared, as the node stamps them: one producer id and one origin per batch.
    let producer = ProducerId("bench".into());
    let origin: Arc<str> = "bench".into();
    let batches: Vec<Vec<Message>> = (0..a.batches)
        .map(|b| {
            (0..a.batch)
                .map(|i| Message {
                    id: MessageId { producer: producer.clone(), epoch: 0, seq: (b * a.batch + i) as u64 },
                    origin: Arc::clone(&origin),
                    publish_time_ms: 0,
                    key: None,
                    headers: Vec::new(),
                    payload: vec![0x5a; a.size],
                })
                .collect()
        })
        .collect();
    let started = std::time::Instant::now();
    for batch in &batches {
        for r in commit_group(&store, &[(batch, OnConflict::Refuse)]) {
            r?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    drop(store);
    std::fs::remove_dir_all(&root)?;
    Ok((a.batches * a.batch * a.size) as f64 / secs / 1e6)
}

async fn storage(a: StorageArgs) -> anyhow::Result<()> {
    let scratch = tempfile_in(&a.dir)?;
    let dir = scratch.path().to_path_buf();
    eprintln!(
        "bench storage: {} batches x {} msgs x {} B, fdatasync per batch, in {} ({} rounds)",
        a.batches,
        a.batch,
        a.size,
        dir.display(),
        a.rounds
    );
    let (mut raw, mut rill) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let r = tokio::task::block_in_place(|| raw_append(&dir, &a))?;
        let l = tokio::task::block_in_place(|| rill_append(&dir, &a, round))?;
        eprintln!("  round {}: raw {r:.1} MB/s, rill log {l:.1} MB/s", round + 1);
        raw.push(r);
        rill.push(l);
    }
    let (r, l) = (median(raw), median(rill));
    println!("storage append: raw {r:.1} MB/s, rill log {l:.1} MB/s (payload), ratio {:.2} (target >= 0.8)", l / r);
    Ok(())
}

pub(crate) fn tempfile_in(dir: &Path) -> anyhow::Result<TempDir> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!(".rill-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(TempDir(path))
}

/// A scratch directory removed on drop.
pub(crate) struct TempDir(std::path::PathBuf);

impl TempDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node in a child process on a scratch data dir, killed on drop.
pub(crate) struct ChildNode {
    child: Child,
    pub(crate) addr: std::net::SocketAddr,
    data: TempDir,
}

impl ChildNode {
    fn start(scratch_parent: &Path) -> anyhow::Result<ChildNode> {
        Self::start_with(tempfile_in(scratch_parent)?, &["--name", "bench-node", "--listen", "127.0.0.1:0"])
    }

    /// A node on data dir `data` with extra flags for `rill node run`.
    pub(crate) fn start_with(data: TempDir, flags: &[&str]) -> anyhow::Result<ChildNode> {
        let exe = std::env::current_exe()?;
        let log_path = data.path().with_extension("log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(exe)
            .args(["node", "run"])
            .args(flags)
            .arg("--data-dir")
            .arg(data.path())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting the node")?;
        let stdout = child.stdout.take().context("node stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().rsplit(' ').next().and_then(|a| a.parse().ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("node did not report its address; its log:\n{log}");
        };
        Ok(ChildNode { child, addr, data })
    }

    pub(crate) fn options(&self) -> ClientOptions {
        ClientOptions::new(self.addr, self.data.path().join("certs"))
    }

    /// The node's log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().with_extension("log")).unwrap_or_default()
    }

    /// SIGTERM and a clean exit (the node flushes its metadata); the data dir stays until
    /// this value is dropped.
    pub(crate) fn stop(&mut self) -> anyhow::Result<std::path::PathBuf> {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        anyhow::ensure!(status.success(), "could not signal the node");
        let exit = self.child.wait()?;
        anyhow::ensure!(exit.success(), "the node did not stop cleanly: {exit}");
        Ok(self.data.path().to_path_buf())
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
        Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The log sits beside the scratch data dir, which removes only itself.
        let _ = std::fs::remove_file(self.data.path().with_extension("log"));
    }
}

/// Flags of `rill bench produce`.
#[derive(Debug, Args)]
pub(crate) struct ProduceArgs {
    /// Messages in the throughput run.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Messages per batch in the throughput run.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Batches in flight in the throughput run.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Rate of the latency run, messages per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Duration of the latency run, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Directory for the node's scratch data dir (the disk being measured).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
}

pub(crate) fn payloads(n: usize, size: usize) -> Vec<Outgoing> {
    (0..n).map(|_| Outgoing::payload(vec![0x5a; size])).collect()
}

async fn produce(a: ProduceArgs) -> anyhow::Result<()> {
    let node = ChildNode::start(&a.dir)?;
    let client = Client::connect(&node.options()).await?;
    let mut p = client.producer("bench/produce/throughput", "bench-throughput".into()).await?;
    eprintln!("bench produce: {} x {} B in batches of {}, {} in flight", a.messages, a.size, a.batch, a.window);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut acked = 0u64;
    while sent < a.messages {
        while p.in_flight() >= a.window {
            acked += p.next_ack().await?.results.len() as u64;
        }
        let n = (a.batch as u64).min(a.messages - sent) as usize;
        p.send(payloads(n, a.size)).await?;
        sent += n as u64;
    }
    for ack in p.flush().await? {
        acked += ack.results.len() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = acked as f64 / secs;
    println!(
        "produce throughput: {acked} msgs in {secs:.2}s = {rate:.0} msgs/s ({:.1} MB/s payload), durable acks (target >= 250000)",
        rate * a.size as f64 / 1e6
    );

    // Latency at a fixed rate: batches every millisecond, each ack timed from its send.
    let per_ms = (a.rate / 1000).max(1) as usize;
    let mut p = client.producer("bench/produce/latency", "bench-latency".into()).await?;
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let start = Instant::now();
    let total_batches = a.seconds * 1000;
    for i in 0..total_batches {
        tokio::time::sleep_until(start + Duration::from_millis(i)).await;
        while p.in_flight() > 0 {
            // Drain acks that are already here without waiting for the others.
            match tokio::time::timeout(Duration::ZERO, p.next_ack()).await {
                Ok(ack) => hist.record(ack?.sent_at.elapsed().as_micros() as u64)?,
                Err(_) => break,
            }
        }
        p.send(payloads(per_ms, a.size)).await?;
    }
    for ack in p.flush().await? {
        hist.record(ack.sent_at.elapsed().as_micros() as u64)?;
    }
    println!(
        "produce latency at {} msgs/s ({} per batch, 1 batch/ms): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        per_ms * 1000,
        per_ms,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0
    );
    client.close().await;
    Ok(())
}

/// Flags of `rill bench rss`.
#[derive(Debug, Args)]
pub(crate) struct RssArgs {
    /// Topics to create (one message each).
    #[arg(long, default_value_t = 100)]
    topics: usize,
    /// Seconds to let the node settle before reading its RSS.
    #[arg(long, default_value_t = 3)]
    settle_seconds: u64,
    /// Directory for the node's scratch data dir.
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
}

async fn rss(a: RssArgs) -> anyhow::Result<()> {
    let node = ChildNode::start(&a.dir)?;
    tokio::time::sleep(Duration::from_secs(a.settle_seconds)).await;
    let empty = node.rss_kib()?;
    let client = Client::connect(&node.options()).await?;
    for t in 0..a.topics {
        let mut p = client.producer(&format!("bench/rss/topic-{t}"), "bench-rss".into()).await?;
        p.send(payloads(1, 256)).await?;
        p.close().await?;
    }
    client.close().await;
    tokio::time::sleep(Duration::from_secs(a.settle_seconds)).await;
    let full = node.rss_kib()?;
    println!(
        "idle RSS: {:.1} MB with no topics, {:.1} MB with {} topics (target <= 30 MB)",
        empty as f64 / 1024.0,
        full as f64 / 1024.0,
        a.topics
    );
    Ok(())
}
