//! `rill conflicts list`.
use clap::Args;

use super::Conn;

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

pub(crate) async fn list(args: ConflictsListArgs) -> anyhow::Result<()> {
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
