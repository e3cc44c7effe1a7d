//! `rill topics list`.
use clap::Args;

use super::Conn;

/// Flags of `rill topics list`.
#[derive(Debug, Args)]
pub(crate) struct TopicsListArgs {
    #[command(flatten)]
    conn: Conn,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn list(args: TopicsListArgs) -> anyhow::Result<()> {
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
