//! `rill-sim`: sweeps seeds of the deterministic simulation and reports invariant
//! violations with the command that replays each.
use std::{collections::BTreeMap, ops::Range, process::ExitCode, time::Duration};

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
    for (i, seed) in args.seeds.clone().enumerate() {
        match run_seed(seed) {
            Ok(report) => {
                simulated += report.simulated;
                for (_, f) in &report.plan.faults {
                    *faults.entry(f.kind()).or_default() += 1;
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
                    eprintln!("  replay: cargo run -p rill-sim --release -- --seeds {seed}..{} --verbose", seed + 1);
                    failed.push(seed);
                }
            }
            Err(e) => {
                eprintln!("\nseed {seed} did not complete: {e}");
                eprintln!("  replay: cargo run -p rill-sim --release -- --seeds {seed}..{} --verbose", seed + 1);
                failed.push(seed);
            }
        }
        let done = i as u64 + 1;
        if done.is_multiple_of(10) || done == total {
            eprint!("\r{done}/{total} seeds, {} failed, {:.0}s", failed.len(), started.elapsed().as_secs_f64());
        }
    }
    eprintln!();
    let faults: Vec<String> = faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "{total} seeds in {:.1}s wall, {:.2} simulated hours; faults: {}; seeds with violations: {} {:?}",
        started.elapsed().as_secs_f64(),
        simulated.as_secs_f64() / 3600.0,
        faults.join(", "),
        failed.len(),
        failed
    );
    if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
