//! `rill fn test`: runs a function's module over sample input, with no node.
use std::{io::BufRead, path::PathBuf, time::Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use rill_storage::{Message, MessageId, NodeName, StoredMessage};

use crate::functions::{
    abi::Input,
    core::{Action, Core, Destination, Settings},
    ids::Deriver,
    runtime::{Limits, Module, Running},
};

/// `rill fn`.
#[derive(Debug, Subcommand)]
pub(crate) enum FnCommand {
    /// Run a module over sample input locally (no node), as a node would: each output and
    /// dead letter as a JSON line on stdout, each run's time on stderr; fails if an input
    /// was dead-lettered.
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
    /// Runs of an input that fails alone, after its first, before it is dead-lettered.
    #[arg(long, default_value_t = 2)]
    retries: u32,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("parameter '{s}' is not key=value"))?;
    Ok((k.to_string(), v.to_string()))
}

#[derive(serde::Serialize)]
struct Printed<'a> {
    id: String,
    topic: &'a str,
    key: Option<String>,
    headers: Vec<(String, String)>,
    payload: String,
}

/// `rill fn test`: the node's operator core over the lines of a file, with this process
/// as the log: retries, dead letters and derived ids as a node would make them.
pub(crate) fn run(cmd: FnCommand) -> anyhow::Result<()> {
    let FnCommand::Test(a) = cmd;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let wasm = std::fs::read(&a.wasm).with_context(|| format!("reading {}", a.wasm.display()))?;
    let module = Module::new(&wasm).with_context(|| a.wasm.display().to_string())?;
    rill_storage::name::check_part("function", &a.name)?;
    let limits = Limits { fuel_per_call: a.fuel, memory_bytes: a.memory_mib << 20, ..Limits::default() };
    let mut running = Running::start(&module, &a.params, limits).context("starting the module")?;
    print_logs(&mut running);
    let input = read_input(&a.input)?;
    let local = NodeName::parse("local")?;
    let settings = Settings {
        name: a.name.clone(),
        deriver: Deriver::new(&a.name, 0),
        input_topic: 0,
        node: local.clone(),
        nodes: vec![local],
        retries_max: a.retries,
    };
    let dead_letters = format!("fn.{}.dlq", a.name);
    let mut core = Core::new(settings, 0);
    core.handle_log_grew();
    let (mut runs, started) = (0usize, Instant::now());
    while let Some(action) = core.poll_action() {
        match action {
            Action::Read { from } => {
                core.handle_read(input.iter().skip(from as usize).take(a.batch).cloned().collect());
            }
            Action::Run { inputs } => {
                let records: Vec<Input<'_>> = inputs
                    .iter()
                    .map(|m| Input {
                        offset: m.offset,
                        publish_time_ms: m.message.publish_time_ms,
                        key: m.message.key.as_deref(),
                        headers: &m.message.headers,
                        payload: &m.message.payload,
                    })
                    .collect();
                let t = Instant::now();
                let result = running.process(&records, a.outputs.len());
                let took = t.elapsed().as_secs_f64() * 1000.0;
                print_logs(&mut running);
                runs += 1;
                let (first, last) = (inputs[0].offset + 1, inputs[inputs.len() - 1].offset + 1);
                match &result {
                    Ok(out) => eprintln!("run {runs}: lines {first}..={last}, {} out, {took:.3} ms", out.len()),
                    Err(e) => eprintln!("run {runs}: lines {first}..={last} failed, {took:.3} ms: {e}"),
                }
                core.handle_run(result, 0);
            }
            Action::Write { messages } => {
                for (destination, m) in &messages {
                    let topic = match destination {
                        Destination::Output(i) => a.outputs[*i as usize].as_str(),
                        Destination::DeadLetter => dead_letters.as_str(),
                    };
                    let printed = Printed {
                        id: m.id.to_string(),
                        topic,
                        key: m.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
                        headers: m
                            .headers
                            .iter()
                            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                            .collect(),
                        payload: String::from_utf8_lossy(&m.payload).into_owned(),
                    };
                    println!("{}", serde_json::to_string(&printed)?);
                }
                core.handle_written(Ok(()));
            }
            Action::Commit { .. } => {}
        }
    }
    let c = core.counters();
    eprintln!(
        "{} in: {} processed, {} out, {} filtered, {} failed runs, {} dead-lettered; {:.1} ms in all",
        input.len(),
        c.processed,
        c.emitted,
        c.filtered,
        c.failed,
        c.dead_lettered,
        started.elapsed().as_secs_f64() * 1000.0
    );
    if c.dead_lettered > 0 {
        bail!("{} input(s) dead-lettered (see their rill-fn-reason headers above)", c.dead_lettered);
    }
    Ok(())
}

/// The file's lines as the messages `<file name>:<line>`, as `rill produce --seq-from-line`
/// would store them.
fn read_input(path: &std::path::Path) -> anyhow::Result<Vec<StoredMessage>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let name: std::sync::Arc<str> = path.file_name().map_or("input".into(), |n| n.to_string_lossy().into());
    let origin: std::sync::Arc<str> = "local".into();
    std::io::BufReader::new(file)
        .split(b'\n')
        .enumerate()
        .map(|(i, line)| {
            let payload = line.with_context(|| format!("reading {}", path.display()))?;
            let id = MessageId::chosen(std::sync::Arc::clone(&name), i as u64 + 1);
            let message = Message {
                id,
                origin: std::sync::Arc::clone(&origin),
                publish_time_ms: 0,
                key: None,
                headers: Vec::new(),
                payload,
            };
            Ok(StoredMessage { offset: i as u64, message })
        })
        .collect()
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
