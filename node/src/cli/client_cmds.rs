//! Client commands: produce, consume, topics list, stats.
use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use rill_transport::backoff::Backoff;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    time::Instant,
};

use super::Conn;
use crate::{
    client::{BatchAck, Client, ClientError, ClientOptions, Outgoing, Producer},
    env::Env,
    protocol::{ConsumerOptions, Produced, StartPosition, SubscriptionType},
};

/// Longest a produce waits for a node to come back before giving up.
const RECONNECT_GIVE_UP: Duration = Duration::from_secs(60);
/// A batch of stdin lines is sent when full or this long after its first line.
const LINGER: Duration = Duration::from_millis(5);
/// Acks held back before stdout is flushed and they are sent.
const ACKS_PENDING_MAX: usize = 512;

/// Flags of `rill topics list`.
#[derive(Debug, Args)]
pub(crate) struct TopicsListArgs {
    #[command(flatten)]
    conn: Conn,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// Flags of `rill conflicts list`.
#[derive(Debug, Args)]
pub(crate) struct ConflictsListArgs {
    #[command(flatten)]
    conn: Conn,
    /// Only this topic's (`tenant/namespace/topic`).
    #[arg(long)]
    topic: Option<String>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// Flags of `rill stats`.
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    conn: Conn,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

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

pub(crate) async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
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
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!("produce: {sent}/{count} sent, {} acknowledged", p.totals.stored + p.totals.duplicates);
        }
    }
    Ok(())
}

/// Output format of `rill consume`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Format {
    /// The payload, one message per line.
    Text,
    /// One JSON object per line with offset, id, origin, time, key, headers and payload.
    Json,
}

/// Flags of `rill consume`.
#[derive(Debug, Args)]
pub(crate) struct ConsumeArgs {
    /// Topic, `tenant/namespace/topic`.
    topic: String,
    #[command(flatten)]
    conn: Conn,
    /// Subscription name; its acked position is stored on the node.
    #[arg(long, short)]
    subscription: String,
    /// Where a new subscription starts: earliest, latest or an offset. An existing
    /// subscription continues after its last ack.
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    from: StartPosition,
    /// Exit after this many messages.
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// How consumers share the subscription: exclusive, failover, shared or key_shared.
    #[arg(long = "type", default_value = "exclusive")]
    kind: SubscriptionType,
    /// This consumer's name (Failover and Key_Shared use it; default: random).
    #[arg(long)]
    name: Option<String>,
    /// Deliver unacked messages again after this many milliseconds.
    #[arg(long)]
    ack_timeout: Option<u64>,
    /// How long a nacked message waits before it is delivered again, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    nack_delay: u64,
    /// A message delivered again more often than this goes to the dead-letter topic.
    #[arg(long)]
    max_redeliveries: Option<u32>,
    /// The dead-letter topic (default `<topic>-DLQ`).
    #[arg(long)]
    dlq: Option<String>,
    /// Nack (instead of ack) every message whose payload contains this text: a stand-in
    /// for an application that fails on some messages.
    #[arg(long)]
    nack_matching: Option<String>,
    /// Read up to the topic's end offset as it is when the command starts, then exit
    /// (at once when the subscription is already there).
    #[arg(long)]
    until_end: bool,
    /// Exit when no message arrives for this long (90s, 15m, 2h).
    #[arg(long, value_parser = parse_timeout)]
    timeout: Option<Duration>,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match super::ns::parse_amount(s, super::ns::DURATION_UNITS, "--timeout") {
        Ok(Some(secs)) if secs > 0 => Ok(Duration::from_secs(secs)),
        Ok(_) => Err("the timeout must be at least 1s".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_start(s: &str) -> Result<StartPosition, String> {
    match s {
        "earliest" => Ok(StartPosition::Earliest),
        "latest" => Ok(StartPosition::Latest),
        n => n.parse().map(StartPosition::Offset).map_err(|_| format!("'{n}' is not earliest, latest or an offset")),
    }
}

fn bytes_json(b: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(b) {
        Ok(s) => serde_json::Value::String(s.to_string()),
        Err(_) => serde_json::json!({ "hex": b.iter().map(|x| format!("{x:02x}")).collect::<String>() }),
    }
}

fn message_json(m: &rill_storage::StoredMessage) -> serde_json::Value {
    let msg = &m.message;
    serde_json::json!({
        "offset": m.offset,
        "id": { "producer": msg.id.producer.0, "epoch": msg.id.epoch, "seq": msg.id.seq },
        "origin": msg.origin,
        "publish_time_ms": msg.publish_time_ms,
        "key": msg.key.as_deref().map(bytes_json),
        "headers": msg.headers.iter().map(|(k, v)| (k.clone(), bytes_json(v))).collect::<serde_json::Map<_, _>>(),
        "payload": bytes_json(&msg.payload),
    })
}

pub(crate) async fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let client = args.conn.connect().await?;
    let options = ConsumerOptions {
        kind: args.kind,
        name: args.name.clone().unwrap_or_default(),
        ack_timeout_ms: args.ack_timeout,
        nack_delay_ms: args.nack_delay,
        max_redeliveries: args.max_redeliveries,
        dead_letter_topic: args.dlq.clone(),
    };
    // The end is read before subscribing: messages produced after the start are not awaited.
    let end = match args.until_end {
        true => Some(client.list_topics().await?.iter().find(|t| t.topic == args.topic).map_or(0, |t| t.end_offset)),
        false => None,
    };
    let mut consumer = client.subscribe_with(&args.topic, &args.subscription, args.from, options).await?;
    let reached = |offset: u64| end.is_some_and(|e| offset >= e);
    let fails = |payload: &[u8]| {
        args.nack_matching.as_ref().is_some_and(|text| payload.windows(text.len().max(1)).any(|w| w == text.as_bytes()))
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut seen = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut done = reached(consumer.start_offset());
    while !done && args.count.is_none_or(|n| seen < n) {
        let next = tokio::select! {
            m = next_within(&mut consumer, args.timeout) => match m? {
                Some(m) => m,
                None => {
                    eprintln!("consume: no message for {}s; exiting", args.timeout.unwrap_or_default().as_secs());
                    break;
                }
            },
            _ = &mut ctrl_c => break,
        };
        let Some(m) = next else {
            eprintln!("consume: the node closed the subscription");
            break;
        };
        if fails(&m.message.payload) {
            consumer.nack(m.offset);
            consumer.flush_acks().await?;
            continue;
        }
        match args.format {
            Format::Text => {
                out.write_all(&m.message.payload)?;
                out.write_all(b"\n")?;
            }
            Format::Json => writeln!(out, "{}", message_json(&m))?,
        }
        consumer.ack(m.offset);
        seen += 1;
        done = reached(m.offset + 1);
        // Acks leave only after what they acknowledge has reached stdout: a crash between
        // printing and acking redelivers rather than loses.
        if done || consumer.buffered() == 0 || consumer.pending_acks() >= ACKS_PENDING_MAX {
            out.flush()?;
            consumer.flush_acks().await?;
        }
    }
    out.flush()?;
    consumer.close().await?;
    client.close().await;
    Ok(())
}

/// The next delivery, or `Ok(None)` when `timeout` passes without one.
async fn next_within(
    consumer: &mut crate::client::Consumer,
    timeout: Option<Duration>,
) -> Result<Option<Option<rill_storage::StoredMessage>>, ClientError> {
    match timeout {
        None => consumer.next().await.map(Some),
        Some(t) => match tokio::time::timeout(t, consumer.next()).await {
            Ok(m) => m.map(Some),
            Err(_) => Ok(None),
        },
    }
}

pub(crate) async fn topics_list(args: TopicsListArgs) -> anyhow::Result<()> {
    let client = args.conn.connect().await?;
    let topics = client.list_topics().await?;
    client.close().await;
    if args.json {
        println!("{}", serde_json::to_string(&topics)?);
        return Ok(());
    }
    println!("{:<48} {:>12} {:>12} {:>14}", "TOPIC", "START", "END", "BYTES");
    for t in topics {
        match &t.error {
            Some(e) => println!("{:<48} UNAVAILABLE: {e}", t.topic),
            None => println!("{:<48} {:>12} {:>12} {:>14}", t.topic, t.start_offset, t.end_offset, t.bytes),
        }
    }
    Ok(())
}

pub(crate) async fn conflicts_list(args: ConflictsListArgs) -> anyhow::Result<()> {
    let client = args.conn.connect().await?;
    let kept = client.list_conflicts(args.topic.as_deref()).await?;
    client.close().await;
    if args.json {
        println!("{}", serde_json::to_string(&kept)?);
        return Ok(());
    }
    println!("{:<36} {:<28} {:>12} {:<16} {:>9}  PAYLOAD", "TOPIC", "ID", "STORED AT", "FROM PEER", "BYTES");
    for k in &kept {
        let payload = String::from_utf8_lossy(&k.message.payload);
        let shown: String = payload.chars().take(40).collect();
        println!(
            "{:<36} {:<28} {:>12} {:<16} {:>9}  {shown}",
            k.topic,
            k.message.id.to_string(),
            k.stored_offset,
            k.from_peer,
            k.message.payload.len()
        );
    }
    eprintln!("{} conflicts kept (STORED AT: the offset of the content the log holds under that id)", kept.len());
    Ok(())
}

pub(crate) async fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let client = args.conn.connect().await?;
    let stats = client.stats().await?;
    client.close().await;
    if args.json {
        println!("{}", serde_json::to_string(&stats)?);
        return Ok(());
    }
    println!("node {} up {:.0}s", stats.node, stats.uptime_ms as f64 / 1000.0);
    for p in &stats.peers {
        let state = if p.connected { "connected" } else { "disconnected" };
        let last = p.last_link_change_ms.map_or_else(
            || "never".to_string(),
            |at| format!("{:.1}s ago", stats.now_ms.saturating_sub(at) as f64 / 1000.0),
        );
        println!(
            "peer {:<20} {state:<12} link bytes sent {} | links up {} replaced {} refused {}, last change {last}",
            p.name, p.link_bytes_sent, p.link_ups, p.link_replacements, p.link_refusals
        );
        for l in &p.lanes {
            println!(
                "  {:<36} lag {:>9} msgs {:>11} B {:>8.1} s | sent {:>9} recv {:>9} dedup {:>9} | cursor {:>10} in flight {:>2}",
                l.topic,
                l.lag_messages,
                l.lag_bytes,
                l.lag_ms as f64 / 1000.0,
                l.sent,
                l.received,
                l.deduplicated,
                l.cursor,
                l.in_flight
            );
        }
    }
    println!(
        "{:<40} {:>10} {:>12} {:>12} {:>12} {:>5} {:>10} {:>10} {:>9} {:>10} {:>8}",
        "TOPIC", "MESSAGES", "BYTES", "START", "END", "SEGS", "IN", "DUPS", "CONFL-REF", "CONFL-KEPT", "EXPIRED"
    );
    for t in &stats.topics {
        if let Some(e) = &t.error {
            println!("{:<40} UNAVAILABLE: {e}", t.topic);
            continue;
        }
        println!(
            "{:<40} {:>10} {:>12} {:>12} {:>12} {:>5} {:>10} {:>10} {:>9} {:>10} {:>8}",
            t.topic,
            t.end_offset - t.start_offset,
            t.bytes,
            t.start_offset,
            t.end_offset,
            t.segments,
            t.messages_in,
            t.duplicates,
            t.conflicts_refused,
            t.conflicts_kept,
            t.expired
        );
        for s in &t.subscriptions {
            let age = s.backlog_age_ms.map_or("-".to_string(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
            println!(
                "  subscription {:<26} ack floor {:>10}  backlog {:>10} msgs {:>12} B age {:>9}  consumers {:>3}  redelivered {:>8}  dead-lettered {:>6}",
                s.name,
                s.ack_floor,
                s.backlog_messages,
                s.backlog_bytes,
                age,
                s.consumers,
                s.redelivered,
                s.dead_lettered,
            );
        }
    }
    Ok(())
}
