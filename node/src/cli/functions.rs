//! `rill fn test`: runs a function's module over sample input, with no node.
use std::{io::BufRead, path::PathBuf, time::Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::functions::{
    abi::Input,
    ids::Deriver,
    runtime::{Limits, Module, Running},
};

/// `rill fn`.
#[derive(Debug, Subcommand)]
pub(crate) enum FnCommand {
    /// Run a module over sample input locally (no node): prints each output as a JSON
    /// line on stdout and each batch's time on stderr.
    Test(TestArgs),
}

/// Flags of `rill fn test`.
#[derive(Debug, Args)]
pub(crate) struct TestArgs {
    /// The module (`.wasm`, guest ABI v1; see `node/src/functions/abi.rs`).
    #[arg(long)]
    wasm: PathBuf,
    /// Sample input: one message payload per line (for example JSON lines).
    #[arg(long)]
    input: PathBuf,
    /// A parameter for the module's `rill_init`, `key=value`; repeat for more.
    #[arg(long = "param", value_parser = parse_param)]
    params: Vec<(String, String)>,
    /// The function's output topics, by name, in order (outputs name them by index).
    #[arg(long = "output", default_values_t = ["out".to_string()])]
    outputs: Vec<String>,
    /// Messages per call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Fuel per call (about one unit per instruction).
    #[arg(long, default_value_t = Limits::default().fuel_per_call)]
    fuel: u64,
    /// Memory the module may use, MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: usize,
    /// The function's name, for the derived ids printed with each output (input line n
    /// is taken as the message `<input file name>:n`, as `rill produce --seq-from-line`).
    #[arg(long, default_value = "test")]
    name: String,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("parameter '{s}' is not key=value"))?;
    Ok((k.to_string(), v.to_string()))
}

#[derive(serde::Serialize)]
struct Printed<'a> {
    input_line: usize,
    id: String,
    topic: &'a str,
    key: Option<String>,
    headers: Vec<(String, String)>,
    payload: String,
}

/// `rill fn test`.
pub(crate) fn run(cmd: FnCommand) -> anyhow::Result<()> {
    let FnCommand::Test(a) = cmd;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let wasm = std::fs::read(&a.wasm).with_context(|| format!("reading {}", a.wasm.display()))?;
    let module = Module::new(&wasm).with_context(|| a.wasm.display().to_string())?;
    rill_storage::name::check_part("function", &a.name)?;
    let deriver = Deriver::new(&a.name, 0);
    let file_name = a.input.file_name().map_or("input".into(), |n| n.to_string_lossy().into_owned());
    let limits = Limits { fuel_per_call: a.fuel, memory_bytes: a.memory_mib << 20, ..Limits::default() };
    let mut running = Running::start(&module, &a.params, limits).context("starting the module")?;
    print_logs(&mut running);
    let file = std::fs::File::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let lines: Vec<Vec<u8>> = std::io::BufReader::new(file)
        .split(b'\n')
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", a.input.display()))?;
    let (mut emitted, started) = (0usize, Instant::now());
    for (n, chunk) in lines.chunks(a.batch).enumerate() {
        let first_line = n * a.batch;
        let inputs: Vec<Input<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(i, payload)| Input {
                offset: (first_line + i) as u64,
                publish_time_ms: 0,
                key: None,
                headers: &[],
                payload,
            })
            .collect();
        let t = Instant::now();
        let outputs = running.process(&inputs, a.outputs.len());
        let took = t.elapsed();
        print_logs(&mut running);
        let outputs = outputs.with_context(|| {
            format!("batch {} (input lines {}..={})", n + 1, first_line + 1, first_line + chunk.len())
        })?;
        let mut rank = std::collections::BTreeMap::<u32, u32>::new();
        for o in &outputs {
            let line = first_line + o.input as usize + 1;
            let k = rank.entry(o.input).or_default();
            let id = deriver.derive(&rill_storage::MessageId::chosen(file_name.as_str(), line as u64), 0, *k);
            *k += 1;
            let printed = Printed {
                input_line: line,
                id: id.to_string(),
                topic: &a.outputs[o.topic as usize],
                key: o.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
                headers: o.headers.iter().map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned())).collect(),
                payload: String::from_utf8_lossy(&o.payload).into_owned(),
            };
            println!("{}", serde_json::to_string(&printed)?);
        }
        emitted += outputs.len();
        eprintln!("batch {}: {} in, {} out, {:.3} ms", n + 1, chunk.len(), outputs.len(), took.as_secs_f64() * 1000.0);
    }
    eprintln!("{} messages in, {emitted} out, {:.1} ms in all", lines.len(), started.elapsed().as_secs_f64() * 1000.0);
    Ok(())
}

fn print_logs(running: &mut Running) {
    let (lines, dropped) = running.take_logs();
    for line in lines {
        eprintln!("guest: {line}");
    }
    if dropped > 0 {
        eprintln!("guest: ({dropped} more log lines dropped)");
    }
}
