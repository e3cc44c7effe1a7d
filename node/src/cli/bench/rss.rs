//! `rill bench rss`.
use std::time::Duration;

use clap::Args;

use crate::client::Client;

use super::{ChildNode, payloads};

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

pub(crate) async fn run(a: RssArgs) -> anyhow::Result<()> {
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
