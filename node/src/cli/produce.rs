//! `rill produce`: stdin lines, a file's lines, or synthetic load, through a producer that
//! reconnects and resends until acknowledged.
use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::Args;
use rill_transport::backoff::Backoff;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    time::Instant,
};

use super::Conn;
use crate::{
    client::{BatchAck, Client, ClientError, ClientOptions, Outgoing, Producer},
    env::Env,
    protocol::Produced,
};

/// How often synthetic load reports its progress.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Longest a produce waits for a node to come back before giving up.
const RECONNECT_GIVE_UP: Duration = Duration::from_secs(60);
/// A batch of stdin lines is sent when full or this long after its first line.
const LINGER: Duration = Duration::from_millis(5);

/// Flags of `rill produce`.
#[derive(Debug, Args)]
pub(crate) struct ProduceArgs {
    /// Topic, `tenant/namespace/topic`.
    topic: String,
    #[command(flatten)]
    conn: Conn,
    /// Read lines from this file instead of stdin.
    #[arg(long, conflicts_with = "count")]
    file: Option<PathBuf>,
    /// Key for every message.
    #[arg(long)]
    key: Option<String>,
    /// Stable producer name; default: a random id (with --seq-from-line: the file's name).
    /// With assigned seqs every run is a new session (a new epoch), so lines sent again by
    /// a rerun are stored again; for exactly once across reruns choose the seqs
    /// (--seq-from-line, --seq-field).
    #[arg(long)]
    producer: Option<String>,
    /// Each line's seq is its 1-based line number: a rerun over the same input after a
    /// crash stores every line once.
    #[arg(long, conflicts_with_all = ["count", "seq_field"])]
    seq_from_line: bool,
    /// Each line is a JSON object whose field NAME (a whole number) is its seq.
    #[arg(long, value_name = "NAME", conflicts_with = "count")]
    seq_field: Option<String>,
    /// Print one JSON line per acknowledged message to stdout, as acks arrive: producer,
    /// epoch, seq, offset (null when a duplicate's offset is forgotten) and duplicate.
    #[arg(long)]
    acks: bool,
    /// Send this many synthetic messages instead of reading lines.
    #[arg(long)]
    count: Option<u64>,
    /// Payload bytes of synthetic messages.
    #[arg(long, default_value_t = 256, requires = "count")]
    size: usize,
    /// Messages per second for synthetic load (default: as fast as acks allow).
    #[arg(long, requires = "count")]
    rate: Option<u64>,
    /// Messages per batch.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch: u64,
    /// Batches in flight before waiting for acks.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    window: u64,
}

impl ProduceArgs {
    /// The producer name: given, or the input file's name with caller-chosen seqs (line
    /// 1 of two files must not share an id), or a random id.
    fn producer_name(&self, env: &Env) -> anyhow::Result<String> {
        if let Some(name) = &self.producer {
            return Ok(name.clone());
        }
        if !self.seq_from_line {
            return Ok(env.random_id());
        }
        let Some(file) = &self.file else {
            bail!("--seq-from-line on stdin needs --producer NAME: line numbers of different inputs must not share ids")
        };
        let name = file.file_name().and_then(|n| n.to_str()).context("the file name is not UTF-8; pass --producer")?;
        Ok(name.to_string())
    }

    /// The caller's seq of line `line_no` (1-based), if seqs are chosen by the caller.
    fn seq_of(&self, line: &str, line_no: u64) -> anyhow::Result<Option<u64>> {
        if self.seq_from_line {
            return Ok(Some(line_no));
        }
        let Some(field) = &self.seq_field else { return Ok(None) };
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("line {line_no} is not JSON (--seq-field {field})"))?;
        match value.get(field).and_then(serde_json::Value::as_u64) {
            Some(seq) if seq < u64::MAX => Ok(Some(seq)),
            _ => bail!("line {line_no} has no whole-number field '{field}' (--seq-field)"),
        }
    }
}

/// Produce totals.
#[derive(Debug, Default)]
struct Totals {
    stored: u64,
    duplicates: u64,
    latencies_us: Vec<u64>,
}

impl Totals {
    fn record(&mut self, ack: &BatchAck) {
        for r in &ack.results {
            match r {
                Produced::Stored(_) => self.stored += 1,
                Produced::Duplicate(_) => self.duplicates += 1,
            }
        }
        self.latencies_us.push(ack.sent_at.elapsed().as_micros() as u64);
    }
}

/// A producer that survives node restarts: on a retriable error it reconnects with
/// backoff and resends what was not acknowledged (the node's dedup drops repeats).
/// Acks are read as they arrive, so the latency it reports is send to ack per batch.
struct ResilientProducer {
    options: ClientOptions,
    client: Client,
    producer: Producer,
    env: Env,
    window: usize,
    totals: Totals,
    /// Where `--acks` lines go.
    acks_out: Option<std::io::Stdout>,
}

impl ResilientProducer {
    async fn open(args: &ProduceArgs) -> anyhow::Result<Self> {
        let env = Env::production();
        let options = ClientOptions::new(args.conn.addr, &args.conn.certs);
        let name = args.producer_name(&env)?;
        let client = args.conn.connect().await?;
        let producer = match args.seq_from_line || args.seq_field.is_some() {
            true => client.producer_with_seqs(&args.topic, name).await?,
            false => client.producer(&args.topic, name).await?,
        };
        let acks_out = args.acks.then(std::io::stdout);
        Ok(ResilientProducer {
            options,
            client,
            producer,
            env,
            window: args.window as usize,
            totals: Totals::default(),
            acks_out,
        })
    }

    async fn send(&mut self, batch: Vec<Outgoing>) -> anyhow::Result<()> {
        while self.producer.in_flight() >= self.window {
            let ack = self.producer.next_ack().await;
            self.on_ack(ack).await?;
        }
        if let Err(e) = self.producer.send(batch).await {
            self.recover(e).await?;
        }
        // Take whatever acks are already here, so their latency is not inflated by waiting.
        while self.producer.in_flight() > 0 {
            match tokio::time::timeout(Duration::ZERO, self.producer.next_ack()).await {
                Ok(ack) => self.on_ack(ack).await?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    async fn on_ack(&mut self, ack: Result<BatchAck, ClientError>) -> anyhow::Result<()> {
        match ack {
            Ok(ack) => {
                self.totals.record(&ack);
                if let Some(out) = &self.acks_out {
                    print_acks(&mut out.lock(), &self.producer, &ack)?;
                }
            }
            Err(e) => self.recover(e).await?,
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        while self.producer.in_flight() > 0 {
            let ack = self.producer.next_ack().await;
            self.on_ack(ack).await?;
        }
        Ok(())
    }

    async fn recover(&mut self, error: ClientError) -> anyhow::Result<()> {
        if !error.is_retriable() {
            return Err(error.into());
        }
        eprintln!("produce: {error}; reconnecting to {}", self.options.addr);
        let deadline = Instant::now() + RECONNECT_GIVE_UP;
        let mut backoff = Backoff::new(100, 5_000);
        loop {
            tokio::time::sleep(Duration::from_millis(backoff.next_delay_ms(self.env.random.next_u64()))).await;
            let attempt = async {
                let client = Client::connect(&self.options).await?;
                self.producer.resume(&client).await?;
                Ok::<_, ClientError>(client)
            };
            match attempt.await {
                Ok(client) => {
                    self.client = client;
                    eprintln!("produce: reconnected; resent {} unacknowledged batch(es)", self.producer.in_flight());
                    return Ok(());
                }
                Err(e) if e.is_retriable() && Instant::now() < deadline => {
                    tracing::debug!(error = %e, "reconnect failed")
                }
                Err(e) => bail!("giving up after {}s: {e}", RECONNECT_GIVE_UP.as_secs()),
            }
        }
    }
}

/// One JSON line per acknowledged message of `ack`.
fn print_acks(out: &mut impl Write, producer: &Producer, ack: &BatchAck) -> std::io::Result<()> {
    for (seq, result) in ack.seqs.iter().zip(&ack.results) {
        let (offset, duplicate) = match result {
            Produced::Stored(offset) => (Some(*offset), false),
            Produced::Duplicate(offset) => (*offset, true),
        };
        let line = serde_json::json!({
            "producer": producer.id(),
            "epoch": producer.epoch(),
            "seq": seq,
            "offset": offset,
            "duplicate": duplicate,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) async fn run(args: ProduceArgs) -> anyhow::Result<()> {
    let mut p = ResilientProducer::open(&args).await?;
    let started = Instant::now();
    let key = args.key.as_ref().map(|k| k.as_bytes().to_vec());
    match args.count {
        Some(count) => produce_synthetic(&mut p, &args, count, key).await?,
        None => produce_lines(&mut p, &args, key).await?,
    }
    p.flush().await?;
    let secs = started.elapsed().as_secs_f64();
    let t = &mut p.totals;
    t.latencies_us.sort_unstable();
    eprintln!(
        "produced {} message(s) to {} as producer {} ({} duplicate(s)) in {secs:.2}s: {:.0} msgs/s, batch send-to-ack latency p50 {:.1} ms p99 {:.1} ms",
        t.stored,
        args.topic,
        p.producer.id(),
        t.duplicates,
        (t.stored + t.duplicates) as f64 / secs.max(1e-9),
        percentile(&t.latencies_us, 0.5) as f64 / 1000.0,
        percentile(&t.latencies_us, 0.99) as f64 / 1000.0,
    );
    p.client.close().await;
    Ok(())
}

/// What woke the line loop.
enum Step {
    Ack(Result<BatchAck, ClientError>),
    Linger,
    Line(Option<String>),
}

async fn produce_lines(p: &mut ResilientProducer, args: &ProduceArgs, key: Option<Vec<u8>>) -> anyhow::Result<()> {
    let input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match &args.file {
        Some(f) => Box::new(tokio::fs::File::open(f).await.with_context(|| format!("opening {}", f.display()))?),
        None => Box::new(tokio::io::stdin()),
    };
    let mut lines = BufReader::new(input).lines();
    let mut batch = Vec::new();
    let mut batch_deadline: Option<Instant> = None;
    let mut line_no = 0u64;
    loop {
        // Both reads are cancel-safe, so acks are taken the moment they arrive.
        let in_flight = p.producer.in_flight() > 0;
        let linger = batch_deadline.unwrap_or_else(Instant::now);
        let step = tokio::select! {
            biased;
            ack = p.producer.next_ack(), if in_flight => Step::Ack(ack),
            () = tokio::time::sleep_until(linger), if batch_deadline.is_some() => Step::Linger,
            line = lines.next_line() => Step::Line(line?),
        };
        match step {
            Step::Ack(ack) => p.on_ack(ack).await?,
            Step::Linger => {
                p.send(std::mem::take(&mut batch)).await?;
                batch_deadline = None;
            }
            Step::Line(None) => break,
            Step::Line(Some(line)) => {
                line_no += 1;
                let seq = args.seq_of(&line, line_no)?;
                batch.push(Outgoing { seq, key: key.clone(), headers: Vec::new(), payload: line.into_bytes() });
                batch_deadline.get_or_insert_with(|| Instant::now() + LINGER);
                if batch.len() as u64 >= args.batch {
                    p.send(std::mem::take(&mut batch)).await?;
                    batch_deadline = None;
                }
            }
        }
    }
    if !batch.is_empty() {
        p.send(batch).await?;
    }
    Ok(())
}

async fn produce_synthetic(
    p: &mut ResilientProducer,
    args: &ProduceArgs,
    count: u64,
    key: Option<Vec<u8>>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_report = started;
    let mut sent = 0u64;
    while sent < count {
        let n = args.batch.min(count - sent);
        if let Some(rate) = args.rate {
            // Pace by schedule, not by sleeping per batch, so ack latency does not slow the rate.
            let due = started + Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
            tokio::time::sleep_until(due).await;
        }
        let batch = (0..n)
            .map(|i| {
                let mut payload = vec![b'x'; args.size];
                let stamp = (sent + i).to_le_bytes();
                let k = stamp.len().min(payload.len());
                payload[..k].copy_from_slice(&stamp[..k]);
                Outgoing { seq: None, key: key.clone(), headers: Vec::new(), payload }
            })
            .collect();
        p.send(batch).await?;
        sent += n;
        if last_report.elapsed() >= REPORT_EVERY {
            last_report = Instant::now();
            eprintln!("produce: {sent}/{count} sent, {} acknowledged", p.totals.stored + p.totals.duplicates);
        }
    }
    Ok(())
}
