//! `rill-sim`: sweeps seeds of the deterministic simulation and reports invariant
//! violations with the command that replays each.
use std::{collections::BTreeMap, io::IsTerminal, ops::Range, process::ExitCode, time::Duration};

use clap::Parser;
use rill_sim::sweep::run_seed;

/// Sweep simulation seeds.
#[derive(Debug, Parser)]
#[command(name = "rill-sim", about)]
struct Args {
    /// Seeds to run, as START..END (END excluded).
    #[arg(long, default_value = "0..200", value_parser = parse_range)]
    seeds: Range<u64>,
    /// Print each seed's plan and trace hash.
    #[arg(long)]
    verbose: bool,
}

fn parse_range(s: &str) -> Result<Range<u64>, String> {
    let (a, b) = s.split_once("..").ok_or_else(|| format!("'{s}' is not START..END"))?;
    let (a, b): (u64, u64) =
        (a.parse().map_err(|_| format!("bad start '{a}'"))?, b.parse().map_err(|_| format!("bad end '{b}'"))?);
    if a >= b {
        return Err(format!("'{s}' is empty"));
    }
    Ok(a..b)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Ok(filter) = std::env::var("RUST_LOG") {
        // Replays with node logs: RUST_LOG=rill_node=debug rill-sim --seeds S..S+1
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let total = args.seeds.end - args.seeds.start;
    let started = std::time::Instant::now();
    let (mut simulated, mut faults, mut failed) = (Duration::ZERO, BTreeMap::<&str, u64>::new(), Vec::new());
    let mut failovers = 0;
    for (i, seed) in args.seeds.clone().enumerate() {
        match run_seed(seed) {
            Ok(report) => {
                simulated += report.simulated;
                failovers += report.failovers;
                for (kind, n) in report.plan.fault_kinds() {
                    *faults.entry(kind).or_default() += n;
                }
                if args.verbose {
                    eprintln!("seed {seed}: trace {:016x} {:?}", report.trace_hash, report.plan);
                }
                if !report.violations.is_empty() {
                    eprintln!("\nseed {seed} VIOLATED:");
                    for v in &report.violations {
                        eprintln!("  {v}");
                    }
                    eprintln!("  plan: {:?}", report.plan);
                    eprintln!("  replay: {}", replay(seed));
                    failed.push(seed);
                }
            }
            Err(e) => {
                eprintln!("\nseed {seed} did not complete: {e}");
                eprintln!("  replay: {}", replay(seed));
                failed.push(seed);
            }
        }
        progress(i as u64 + 1, total, failed.len(), started.elapsed());
    }
    eprintln!();
    let faults: Vec<String> = faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "{total} seeds in {:.1}s wall, {:.2} simulated hours\nfaults injected: {}; producer failovers {failovers}\nseeds with violations: {} {:?}",
        started.elapsed().as_secs_f64(),
        simulated.as_secs_f64() / 3600.0,
        faults.join(", "),
        failed.len(),
        failed
    );
    if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn replay(seed: u64) -> String {
    format!("RUST_LOG=rill_node=debug cargo run -p rill-sim --release -- --seeds {seed}..{} --verbose", seed + 1)
}

/// A progress bar on one line of stderr, redrawn after every seed (on a terminal; else a
/// line every tenth of the way).
fn progress(done: u64, total: u64, failed: usize, elapsed: Duration) {
    const WIDTH: u64 = 30;
    let terminal = std::io::stderr().is_terminal();
    let new_tenth = done * 10 / total > (done - 1) * 10 / total;
    if !terminal && !new_tenth {
        return;
    }
    let filled = (done * WIDTH / total) as usize;
    let eta = elapsed.as_secs_f64() / done as f64 * (total - done) as f64;
    eprint!(
        "{}[{}{}] {done}/{total} seeds, {failed} with violations, {:.0}s, about {eta:.0}s left {}",
        if terminal { "\r" } else { "" },
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled),
        elapsed.as_secs_f64(),
        if terminal { "" } else { "\n" },
    );
}
