//! `rill stats`.
use clap::Args;

use super::Conn;

#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    conn: Conn,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let client = args.conn.connect().await?;
    let stats = client.stats().await?;
    client.close().await;
    if args.json {
        println!("{}", serde_json::to_string(&stats)?);
        return Ok(());
    }
    print_peers(&stats);
    print_functions(&stats);
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

/// One line per function and input topic.
fn print_functions(stats: &crate::protocol::NodeStats) {
    for f in &stats.functions {
        println!(
            "function {} on {}: processed {} out {} filtered {} failed {} dead-lettered {} held {} | lag {} msgs {:.1} s | run p50 {:.2} ms p99 {:.2} ms",
            f.name,
            f.input,
            f.processed,
            f.emitted,
            f.filtered,
            f.failed,
            f.dead_lettered,
            f.skipped_held,
            f.lag_messages,
            f.lag_ms as f64 / 1000.0,
            f.run_p50_us as f64 / 1000.0,
            f.run_p99_us as f64 / 1000.0
        );
    }
}

/// The node's line and one block per peer, with its lanes.
fn print_peers(stats: &crate::protocol::NodeStats) {
    println!("node {} up {:.0}s", stats.node, stats.uptime_ms as f64 / 1000.0);
    if !stats.refusals.is_empty() || stats.entries_refused > 0 {
        let per: Vec<String> = stats.refusals.iter().map(|(p, n)| format!("{p} {n}")).collect();
        let entries = stats.entries_refused;
        println!("refused requests: {} | catalogue entries from peers that did not verify: {entries}", per.join(", "));
    }
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
}
