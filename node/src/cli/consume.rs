//! `rill consume`: a durable subscription, printed one message per line.
use std::{io::Write, time::Duration};

use clap::{Args, ValueEnum};

use super::Conn;
use crate::{
    client::ClientError,
    protocol::{ConsumerOptions, StartPosition, SubscriptionType},
};

/// Acks held back before stdout is flushed and they are sent.
const ACKS_PENDING_MAX: usize = 512;

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
        Err(_) => serde_json::json!({ "hex": rill_storage::hex::encode(b) }),
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

pub(crate) async fn run(args: ConsumeArgs) -> anyhow::Result<()> {
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
