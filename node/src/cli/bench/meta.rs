//! `rill bench meta`.
use clap::Args;

use super::tempfile_in;

/// Flags of `rill bench meta`.
#[derive(Debug, Args)]
pub(crate) struct MetaArgs {
    /// Directory on the disk to measure (a scratch dir inside it is removed after).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// Flushes per store.
    #[arg(long, default_value_t = 2000)]
    flushes: usize,
    /// Puts before each flush (of 200-byte values, over 500 keys).
    #[arg(long, default_value_t = 20)]
    puts: usize,
}

/// `rill bench meta`.
pub(crate) fn run(a: MetaArgs) -> anyhow::Result<()> {
    use rill_storage::{
        meta::{MetaStore, SledMeta},
        metalog::LogMeta,
    };
    let scratch = tempfile_in(&a.dir)?;
    let value = vec![0x5a; 200];
    let run = |store: &dyn MetaStore| -> anyhow::Result<(u64, u64)> {
        let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
        for f in 0..a.flushes {
            for p in 0..a.puts {
                store.put(&format!("sub/t/n/x/s{}", (f * a.puts + p) % 500), &value)?;
            }
            let started = std::time::Instant::now();
            store.flush()?;
            hist.record(started.elapsed().as_micros() as u64)?;
        }
        Ok((hist.value_at_quantile(0.5), hist.value_at_quantile(0.99)))
    };
    let log_path = scratch.path().join("meta.log");
    let sled_path = scratch.path().join("meta");
    let (log_p50, log_p99) = run(&LogMeta::open(&log_path)?)?;
    let (sled_p50, sled_p99) = run(&SledMeta::open(&sled_path)?)?;
    let reopen = |f: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let started = std::time::Instant::now();
        f()?;
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    };
    let log_open = reopen(&|| LogMeta::open(&log_path).map(drop).map_err(Into::into))?;
    let sled_open = reopen(&|| SledMeta::open(&sled_path).map(drop).map_err(Into::into))?;
    println!("{} flushes of {} puts each:", a.flushes, a.puts);
    println!("  metadata log  flush p50 {log_p50} us, p99 {log_p99} us, reopen {log_open:.1} ms");
    println!("  sled          flush p50 {sled_p50} us, p99 {sled_p99} us, reopen {sled_open:.1} ms");
    println!("(sled's flush leaves its store unsynced: see the power-cut test sled_leaves_a_flushed_entry_unsynced)");
    Ok(())
}
