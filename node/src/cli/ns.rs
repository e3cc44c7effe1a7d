//! `rill ns`: namespace commands. An edit is made on the node the command talks to and
//! spreads to the mesh from there; it works during a partition and converges after.
use std::collections::BTreeSet;

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use rill_replication::namespace::{Edit, OnFull};

use super::Conn;

/// Namespace commands.
#[derive(Debug, Subcommand)]
pub(crate) enum NsCommand {
    /// Create a namespace.
    Create(NsArgs),
    /// Set the nodes that hold a namespace.
    SetClusters {
        #[command(flatten)]
        ns: NsArgs,
        /// Comma-separated node names.
        #[arg(long, value_delimiter = ',', required = true)]
        clusters: Vec<String>,
    },
    /// Set policy fields of a namespace.
    Policy {
        #[command(flatten)]
        ns: NsArgs,
        /// Retention age: seconds, or with a unit (90s, 15m, 12h, 7d); "none" to lift.
        #[arg(long)]
        retention_age: Option<String>,
        /// Retention size per topic: bytes, or with a unit (500MiB, 2GiB); "none" to lift.
        #[arg(long)]
        retention_size: Option<String>,
        /// Retention count per topic: a number of messages; "none" to lift.
        #[arg(long)]
        retention_messages: Option<String>,
        /// Backlog limit per namespace: bytes or with a unit; "none" to lift.
        #[arg(long)]
        backlog_max: Option<String>,
        /// What producers get when the backlog is full.
        #[arg(long, value_enum)]
        on_full: Option<OnFullArg>,
        /// Producer sessions idle this long may be dropped from dedup state, keeping their
        /// highest seq (older ids are then refused as expired): seconds or with a unit
        /// (30d); "none" for the default, 30 days. Never below the retention age.
        #[arg(long)]
        dedup_horizon: Option<String>,
    },
    /// Show namespaces and their policies as this node sees them.
    Get {
        /// Only this namespace.
        namespace: Option<String>,
        #[command(flatten)]
        conn: Conn,
        /// Print one JSON object, namespace -> policy, instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A namespace and where to send the command.
#[derive(Debug, Args)]
pub(crate) struct NsArgs {
    /// `tenant/namespace`.
    namespace: String,
    #[command(flatten)]
    conn: Conn,
}

/// `--on-full` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum OnFullArg {
    /// Refuse new messages.
    Reject,
    /// Drop the oldest segments.
    DropOldest,
}

/// Parses "none" or a number with an optional unit from `units` (name, multiplier).
pub(crate) fn parse_amount(text: &str, units: &[(&str, u64)], what: &str) -> anyhow::Result<Option<u64>> {
    if text == "none" {
        return Ok(None);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let Ok(n) = digits.parse::<u64>() else { bail!("{what} '{text}' does not start with a number") };
    let Some((_, mult)) = units.iter().find(|(u, _)| *u == unit) else {
        let names: Vec<&str> = units.iter().map(|(u, _)| *u).filter(|u| !u.is_empty()).collect();
        bail!("{what} '{text}': unknown unit '{unit}' (use {})", names.join(", "));
    };
    n.checked_mul(*mult).map(Some).ok_or_else(|| anyhow::anyhow!("{what} '{text}' is too large"))
}

pub(crate) const DURATION_UNITS: &[(&str, u64)] = &[("", 1), ("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)];
const SIZE_UNITS: &[(&str, u64)] =
    &[("", 1), ("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40)];

pub(crate) async fn run(cmd: NsCommand) -> anyhow::Result<()> {
    match cmd {
        NsCommand::Create(a) => edit(&a, vec![Edit::Create]).await,
        NsCommand::SetClusters { ns, clusters } => {
            let set = clusters
                .iter()
                .filter(|c| !c.is_empty())
                .map(|c| rill_storage::NodeName::parse(c))
                .collect::<Result<BTreeSet<_>, _>>()?;
            if set.is_empty() {
                bail!("--clusters needs at least one node name");
            }
            edit(&ns, vec![Edit::SetClusters(set)]).await
        }
        NsCommand::Policy {
            ns,
            retention_age,
            retention_size,
            retention_messages,
            backlog_max,
            on_full,
            dedup_horizon,
        } => {
            let mut edits = Vec::new();
            if let Some(h) = dedup_horizon {
                edits.push(Edit::DedupHorizon(parse_amount(&h, DURATION_UNITS, "dedup horizon")?));
            }
            if let Some(a) = retention_age {
                edits.push(Edit::RetentionAge(parse_amount(&a, DURATION_UNITS, "retention age")?));
            }
            if let Some(s) = retention_size {
                edits.push(Edit::RetentionBytes(parse_amount(&s, SIZE_UNITS, "retention size")?));
            }
            if let Some(m) = retention_messages {
                edits.push(Edit::RetentionMessages(parse_amount(&m, &[("", 1)], "retention count")?));
            }
            if let Some(b) = backlog_max {
                edits.push(Edit::BacklogBytesMax(parse_amount(&b, SIZE_UNITS, "backlog limit")?));
            }
            if let Some(f) = on_full {
                edits.push(Edit::OnFull(match f {
                    OnFullArg::Reject => OnFull::Reject,
                    OnFullArg::DropOldest => OnFull::DropOldest,
                }));
            }
            if edits.is_empty() {
                bail!(
                    "nothing to change: give --retention-age, --retention-size, --retention-messages, --backlog-max, --on-full or --dedup-horizon"
                );
            }
            edit(&ns, edits).await
        }
        NsCommand::Get { namespace, conn, json } => get(namespace, &conn, json).await,
    }
}

async fn edit(ns: &NsArgs, edits: Vec<Edit>) -> anyhow::Result<()> {
    let client = ns.conn.connect().await?;
    for e in edits {
        client.ns_edit(&ns.namespace, e).await?;
    }
    client.close().await;
    Ok(())
}

fn show<T: std::fmt::Debug>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "none".to_string(), |x| format!("{x:?}"))
}

async fn get(namespace: Option<String>, conn: &Conn, json: bool) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    let doc = client.ns_get().await?;
    client.close().await;
    let chosen: Vec<_> = doc.iter().filter(|(n, _)| namespace.as_ref().is_none_or(|want| want == n.as_str())).collect();
    if let (Some(want), true) = (&namespace, chosen.is_empty()) {
        bail!("namespace '{want}' does not exist on this node");
    }
    if json {
        let all: serde_json::Map<String, serde_json::Value> = chosen
            .iter()
            .map(|(name, p)| {
                let policy = serde_json::json!({
                    "clusters": p.clusters.val,
                    "retention_age_s": p.retention_age_s.val,
                    "retention_bytes": p.retention_bytes.val,
                    "retention_messages": p.retention_messages.val,
                    "backlog_bytes_max": p.backlog_bytes_max.val,
                    "on_full": match p.on_full.val {
                        OnFull::Reject => "reject",
                        OnFull::DropOldest => "drop-oldest",
                    },
                    "dedup_horizon_s": p.dedup_horizon_s.val,
                    "effective_dedup_horizon_s": p.dedup_horizon_ms() / 1000,
                });
                (name.to_string(), policy)
            })
            .collect();
        println!("{}", serde_json::Value::Object(all));
        return Ok(());
    }
    for (name, p) in chosen {
        let clusters: Vec<&str> = p.clusters.val.iter().map(rill_storage::NodeName::as_str).collect();
        println!("{name}");
        println!("  clusters        {}", clusters.join(","));
        println!("  retention age   {} s", show(&p.retention_age_s.val));
        println!("  retention size  {} bytes", show(&p.retention_bytes.val));
        println!("  retention count {} messages", show(&p.retention_messages.val));
        println!("  backlog max     {} bytes", show(&p.backlog_bytes_max.val));
        println!("  on full         {:?}", p.on_full.val);
        println!("  dedup horizon   {} s (set: {})", p.dedup_horizon_ms() / 1000, show(&p.dedup_horizon_s.val));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_with_units() {
        assert_eq!(parse_amount("7d", DURATION_UNITS, "age").unwrap(), Some(7 * 86_400));
        assert_eq!(parse_amount("90", DURATION_UNITS, "age").unwrap(), Some(90));
        assert_eq!(parse_amount("2GiB", SIZE_UNITS, "size").unwrap(), Some(2 << 30));
        assert_eq!(parse_amount("none", SIZE_UNITS, "size").unwrap(), None);
        assert!(parse_amount("2GB", SIZE_UNITS, "size").unwrap_err().to_string().contains("unknown unit 'GB'"));
        assert!(
            parse_amount("x", SIZE_UNITS, "size").unwrap_err().to_string().contains("does not start with a number")
        );
        assert!(parse_amount("99999999999TiB", SIZE_UNITS, "size").unwrap_err().to_string().contains("too large"));
    }
}
