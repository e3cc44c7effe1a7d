//! `rill bench storage`.
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use clap::Args;
use rill_storage::{
    Message, MessageId, ProducerId, TopicName,
    fs::StdFs,
    log::LogConfig,
    meta::MemMeta,
    topic::{OnConflict, TopicStore, commit_group},
};

use super::support::{median, tempfile_in};

/// Flags of `rill bench storage`.
#[derive(Debug, Args)]
pub(crate) struct StorageArgs {
    /// Directory on the disk to measure (a scratch dir inside it is removed after).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// Batches per run.
    #[arg(long, default_value_t = 200)]
    batches: usize,
    /// Messages per batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Rounds of (raw, rill), alternating.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// The baseline: the same payload bytes appended with one fdatasync per batch. Each batch
/// is its own buffer, built before the clock starts, as the log's batches are: rewriting
/// one buffer would keep it in the CPU cache and flatter the baseline.
fn raw_append(dir: &Path, a: &StorageArgs) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("raw.bin");
    let mut f = std::fs::File::create(&path)?;
    let chunks: Vec<Vec<u8>> = (0..a.batches).map(|b| vec![b as u8; a.batch * a.size]).collect();
    let started = std::time::Instant::now();
    for chunk in &chunks {
        f.write_all(chunk)?;
        f.sync_data()?;
    }
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok((a.batches * a.batch * a.size) as f64 / secs / 1e6)
}

fn rill_append(dir: &Path, a: &StorageArgs, round: usize) -> anyhow::Result<f64> {
    let root = dir.join(format!("rill-{round}"));
    let meta = MemMeta::default();
    let topic = TopicName::parse("bench/storage/t")?;
    let store = Mutex::new(TopicStore::open(Arc::new(StdFs), &meta, &root, topic, LogConfig::default())?);
    // Shared, as the node stamps them: one producer id and one origin per batch.
    let producer = ProducerId("bench".into());
    let origin: Arc<str> = "bench".into();
    let batches: Vec<Vec<Message>> = (0..a.batches)
        .map(|b| {
            (0..a.batch)
                .map(|i| Message {
                    id: MessageId { producer: producer.clone(), epoch: 0, seq: (b * a.batch + i) as u64 },
                    origin: Arc::clone(&origin),
                    publish_time_ms: 0,
                    key: None,
                    headers: Vec::new(),
                    payload: vec![0x5a; a.size],
                })
                .collect()
        })
        .collect();
    let started = std::time::Instant::now();
    for batch in &batches {
        for r in commit_group(&store, &[(batch, OnConflict::Refuse)]) {
            r?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    drop(store);
    std::fs::remove_dir_all(&root)?;
    Ok((a.batches * a.batch * a.size) as f64 / secs / 1e6)
}

pub(crate) async fn run(a: StorageArgs) -> anyhow::Result<()> {
    let scratch = tempfile_in(&a.dir)?;
    let dir = scratch.path().to_path_buf();
    eprintln!(
        "bench storage: {} batches x {} msgs x {} B, fdatasync per batch, in {} ({} rounds)",
        a.batches,
        a.batch,
        a.size,
        dir.display(),
        a.rounds
    );
    let (mut raw, mut rill) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let r = tokio::task::block_in_place(|| raw_append(&dir, &a))?;
        let l = tokio::task::block_in_place(|| rill_append(&dir, &a, round))?;
        eprintln!("  round {}: raw {r:.1} MB/s, rill log {l:.1} MB/s", round + 1);
        raw.push(r);
        rill.push(l);
    }
    let (r, l) = (median(raw), median(rill));
    println!("storage append: raw {r:.1} MB/s, rill log {l:.1} MB/s (payload), ratio {:.2} (target >= 0.8)", l / r);
    Ok(())
}
