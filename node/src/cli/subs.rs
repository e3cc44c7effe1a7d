//! `rill subs`: list a topic's subscriptions, move one (seek), or reset one.
use anyhow::bail;
use clap::{Args, Subcommand};

use super::{Conn, ns};
use crate::protocol::SeekTarget;

/// Subscription commands.
#[derive(Debug, Subcommand)]
pub(crate) enum SubsCommand {
    /// Delete a subscription (its position and ack state); refused while consumers are
    /// attached.
    Delete {
        #[command(flatten)]
        sub: SubArgs,
    },
    /// List a topic's subscriptions with their backlog and consumers.
    List {
        /// `tenant/namespace/topic`.
        topic: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Move a subscription to an offset or a publish time; its consumers are disconnected
    /// and continue from there.
    Seek {
        #[command(flatten)]
        sub: SubArgs,
        /// To this offset.
        #[arg(long, conflicts_with_all = ["time", "ago"])]
        offset: Option<u64>,
        /// To the first message published at or after this time (milliseconds since the
        /// Unix epoch).
        #[arg(long, conflicts_with = "ago")]
        time: Option<u64>,
        /// To the first message published at most this long ago (90s, 15m, 2h, 1d).
        #[arg(long)]
        ago: Option<String>,
    },
    /// Move a subscription to the first message held (or with --latest, past the last):
    /// its acked state is dropped.
    Reset {
        #[command(flatten)]
        sub: SubArgs,
        /// Skip everything held now instead.
        #[arg(long)]
        latest: bool,
    },
}

/// A topic and one of its subscriptions.
#[derive(Debug, Args)]
pub(crate) struct SubArgs {
    /// `tenant/namespace/topic`.
    topic: String,
    /// Subscription name.
    subscription: String,
    #[command(flatten)]
    conn: Conn,
}

pub(crate) async fn run(cmd: SubsCommand) -> anyhow::Result<()> {
    match cmd {
        SubsCommand::List { topic, conn } => list(&topic, &conn).await,
        SubsCommand::Delete { sub } => {
            let client = sub.conn.connect().await?;
            client.delete_subscription(&sub.topic, &sub.subscription).await?;
            client.close().await;
            println!("subscription '{}' on {} deleted", sub.subscription, sub.topic);
            Ok(())
        }
        SubsCommand::Seek { sub, offset, time, ago } => {
            let target = match (offset, time, ago) {
                (Some(o), _, _) => SeekTarget::Offset(o),
                (_, Some(t), _) => SeekTarget::PublishTime(t),
                (_, _, Some(a)) => {
                    let secs = ns::parse_amount(&a, ns::DURATION_UNITS, "--ago")?.unwrap_or(0);
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
                    SeekTarget::PublishTime(now.saturating_sub(secs.saturating_mul(1000)))
                }
                _ => bail!("say where to: --offset, --time or --ago"),
            };
            seek(&sub, target).await
        }
        SubsCommand::Reset { sub, latest } => {
            seek(&sub, if latest { SeekTarget::Latest } else { SeekTarget::Earliest }).await
        }
    }
}

async fn seek(sub: &SubArgs, target: SeekTarget) -> anyhow::Result<()> {
    let client = sub.conn.connect().await?;
    let offset = client.seek(&sub.topic, &sub.subscription, target).await?;
    client.close().await;
    println!("subscription '{}' on {} now at offset {offset}", sub.subscription, sub.topic);
    Ok(())
}

async fn list(topic: &str, conn: &Conn) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    let stats = client.stats().await?;
    client.close().await;
    let Some(t) = stats.topics.iter().find(|t| t.topic == topic) else { bail!("the node has no topic {topic}") };
    println!(
        "{:<28} {:>9} {:>12} {:>12} {:>14} {:>10} {:>11} {:>13}",
        "SUBSCRIPTION", "CONSUMERS", "ACK FLOOR", "BACKLOG", "BACKLOG BYTES", "AGE", "REDELIVERED", "DEAD-LETTERED"
    );
    for s in &t.subscriptions {
        let age = s.backlog_age_ms.map_or("-".to_string(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        println!(
            "{:<28} {:>9} {:>12} {:>12} {:>14} {:>10} {:>11} {:>13}",
            s.name, s.consumers, s.ack_floor, s.backlog_messages, s.backlog_bytes, age, s.redelivered, s.dead_lettered
        );
    }
    Ok(())
}
