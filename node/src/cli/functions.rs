//! `rill fn ...`: stream functions: try a module locally, create, list, update, pause,
//! resume, delete.
use std::{io::BufRead, path::PathBuf, time::Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use rill_replication::{
    access::{Body, Entry, Incarnation},
    function::{FunctionDef, Start},
};
use rill_storage::{Message, MessageId, NodeName, StoredMessage};

use super::Conn;
use crate::client::Client;

use crate::functions::{
    abi::Input,
    core::{Action, Core, Destination, Settings, States},
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
    /// Create a function (needs admin of every namespace it touches): uploads its module
    /// to the node and puts its definition in the catalogue, from where every node of the
    /// function picks it up.
    Create(CreateArgs),
    /// List the functions the principal may see.
    List(super::access::ListArgs),
    /// Show one function's definition and, on the node asked, how it is doing.
    Get(GetArgs),
    /// Change a function's module, parameters or nodes; it keeps its position in its
    /// inputs (a node that gains inputs from a change takes over where their last owner
    /// left them).
    Update(UpdateArgs),
    /// Stop a function on every node; its position is kept.
    Pause(NameArgs),
    /// Start a paused function again where it stopped.
    Resume(NameArgs),
    /// Delete a function (its outputs stay; re-creating starts afresh).
    Delete(NameArgs),
}

/// Flags of `rill fn create`.
#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// `tenant/namespace/name`.
    name: String,
    /// The module (`.wasm`, guest ABI v1).
    #[arg(long)]
    wasm: PathBuf,
    /// Input topics, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    input: Vec<String>,
    /// Output topics, comma-separated; a guest names them by index.
    #[arg(long, value_delimiter = ',', required = true)]
    output: Vec<String>,
    /// The nodes that run it, comma-separated (default: the first input namespace's
    /// clusters).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// Where it starts reading: earliest or latest.
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    from: Start,
    /// A parameter for the module's `rill_init`, `key=value`; repeat for more.
    #[arg(long = "param", value_parser = parse_param)]
    params: Vec<(String, String)>,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `rill fn update`.
#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    /// `tenant/namespace/name`.
    name: String,
    /// A new module.
    #[arg(long)]
    wasm: Option<PathBuf>,
    /// New parameters (replacing all of the old ones when any is given).
    #[arg(long = "param", value_parser = parse_param)]
    params: Vec<(String, String)>,
    /// The nodes that run it from now on, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "default_nodes")]
    nodes: Vec<String>,
    /// Run it on its first input namespace's clusters again (the default at create).
    #[arg(long)]
    default_nodes: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `rill fn get`.
#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// `tenant/namespace/name`.
    name: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// A function as `rill fn list` and `rill fn get` print it.
#[derive(serde::Serialize)]
struct Row {
    name: String,
    entry: String,
    module: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    nodes: Option<Vec<String>>,
    params: Vec<(String, String)>,
    paused: bool,
}

impl Row {
    fn of(name: &str, incarnation: Incarnation, d: &FunctionDef) -> Row {
        Row {
            name: name.to_string(),
            entry: incarnation.to_string(),
            module: rill_storage::hex::encode(&d.module),
            inputs: d.inputs.clone(),
            outputs: d.outputs.clone(),
            nodes: d.nodes.as_ref().map(|n| n.iter().map(ToString::to_string).collect()),
            params: d.params.clone(),
            paused: d.paused,
        }
    }
}

/// A function's name and where to send the command.
#[derive(Debug, Args)]
pub(crate) struct NameArgs {
    /// `tenant/namespace/name`.
    name: String,
    #[command(flatten)]
    conn: Conn,
}

fn parse_start(s: &str) -> Result<Start, String> {
    match s {
        "earliest" => Ok(Start::Earliest),
        "latest" => Ok(Start::Latest),
        _ => Err(format!("'{s}' is neither earliest nor latest")),
    }
}

/// Reads and checks a module locally, so a bad file is refused before anything is sent.
fn load_module(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let wasm = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Module::new(&wasm).with_context(|| path.display().to_string())?;
    Ok(wasm)
}

/// Uploads `wasm` for a function in `namespace`; checks the node stored what was sent.
async fn upload(client: &Client, namespace: &str, wasm: Vec<u8>) -> anyhow::Result<[u8; 32]> {
    let want = rill_storage::blobs::hash(&wasm);
    let got = client.put_blob(namespace, wasm).await?;
    anyhow::ensure!(got == want, "the node stored another module than the one sent");
    Ok(got)
}

/// The function in force under `name`, as the node sees it.
async fn current(client: &Client, name: &str) -> anyhow::Result<(Incarnation, FunctionDef)> {
    let (_, access) = super::access::catalogue(client).await?;
    access.functions().get(name).cloned().with_context(|| format!("no function '{name}' (rill fn list shows them)"))
}

/// Signs and sends an edit of `name`'s definition.
async fn edit(client: &Client, name: &str, change: impl FnOnce(&mut FunctionDef)) -> anyhow::Result<()> {
    let (incarnation, mut def) = current(client, name).await?;
    change(&mut def);
    def.check().map_err(anyhow::Error::msg)?;
    let signed = client.sign(Body::Edit { incarnation, entry: Entry::Function(def) }, super::access::now_ms())?;
    client.catalogue_edit(signed).await?;
    Ok(())
}

/// `rill fn create|list|update|pause|resume|delete`.
pub(crate) async fn manage(cmd: FnCommand) -> anyhow::Result<()> {
    match cmd {
        FnCommand::Test(a) => test(a),
        FnCommand::Create(a) => {
            let nodes = if a.nodes.is_empty() {
                None
            } else {
                Some(a.nodes.iter().map(|n| NodeName::parse(n)).collect::<Result<_, _>>()?)
            };
            let mut def = FunctionDef {
                name: a.name.clone(),
                module: [0; 32],
                inputs: a.input,
                outputs: a.output,
                nodes,
                start: a.from,
                params: a.params,
                paused: false,
            };
            def.check().map_err(anyhow::Error::msg)?;
            let wasm = load_module(&a.wasm)?;
            let namespace = def.namespace().context("the function's namespace")?.to_string();
            let created = a
                .conn
                .run(async |client| {
                    def.module = upload(client, &namespace, wasm).await?;
                    super::access::create(client, Entry::Function(def)).await
                })
                .await?;
            println!("created function {} (entry {created})", a.name);
            Ok(())
        }
        FnCommand::List(args) => {
            let (_, access) = args.conn.run(super::access::catalogue).await?;
            let rows: Vec<Row> = access.functions().iter().map(|(name, (i, d))| Row::of(name, *i, d)).collect();
            let header = format!("{:<32} {:<8} {:<12} {}", "FUNCTION", "STATE", "MODULE", "INPUTS -> OUTPUTS");
            super::access::print_rows(&rows, args.json, &header, |r| {
                let state = if r.paused { "paused" } else { "active" };
                format!(
                    "{:<32} {state:<8} {:<12} {} -> {}",
                    r.name,
                    &r.module[..12],
                    r.inputs.join(","),
                    r.outputs.join(",")
                )
            })
        }
        FnCommand::Get(a) => {
            let name = &a.name;
            let ((incarnation, def), stats) =
                a.conn.run(async |client| Ok((current(client, name).await?, client.stats().await?))).await?;
            let tasks: Vec<&crate::protocol::FunctionStats> =
                stats.functions.iter().filter(|f| f.name == *name).collect();
            if a.json {
                #[derive(serde::Serialize)]
                struct Got<'a> {
                    #[serde(flatten)]
                    def: Row,
                    here: Vec<&'a crate::protocol::FunctionStats>,
                }
                println!(
                    "{}",
                    serde_json::to_string_pretty(&Got { def: Row::of(name, incarnation, &def), here: tasks })?
                );
                return Ok(());
            }
            let row = Row::of(name, incarnation, &def);
            println!("function {} (entry {})", row.name, row.entry);
            println!("  module   {}", row.module);
            println!("  inputs   {}", row.inputs.join(", "));
            println!("  outputs  {}", row.outputs.join(", "));
            let nodes = row.nodes.map_or("the first input namespace's clusters".into(), |n| n.join(", "));
            println!("  nodes    {nodes}");
            let params: Vec<String> = row.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("  params   {}", if params.is_empty() { "(none)".into() } else { params.join(" ") });
            println!("  state    {}", if row.paused { "paused" } else { "active" });
            if tasks.is_empty() {
                println!("  on this node: not running (not one of its nodes, paused, or waiting for its module)");
            }
            for t in tasks {
                println!(
                    "  on this node, input {}: processed {}, out {}, filtered {}, failed runs {}, dead-lettered {}, lag {} messages / {} ms",
                    t.input, t.processed, t.emitted, t.filtered, t.failed, t.dead_lettered, t.lag_messages, t.lag_ms
                );
            }
            Ok(())
        }
        FnCommand::Update(a) => {
            let wasm = a.wasm.as_deref().map(load_module).transpose()?;
            let nodes: Option<Option<std::collections::BTreeSet<NodeName>>> = if a.default_nodes {
                Some(None)
            } else if a.nodes.is_empty() {
                None
            } else {
                Some(Some(a.nodes.iter().map(|n| NodeName::parse(n)).collect::<Result<_, _>>()?))
            };
            let (name, params) = (&a.name, a.params);
            a.conn
                .run(async |client| {
                    let module = match wasm {
                        Some(wasm) => {
                            let (_, def) = current(client, name).await?;
                            let ns = def.namespace().context("the function's namespace")?.to_string();
                            Some(upload(client, &ns, wasm).await?)
                        }
                        None => None,
                    };
                    edit(client, name, |d| {
                        if let Some(m) = module {
                            d.module = m;
                        }
                        if !params.is_empty() {
                            d.params = params;
                        }
                        if let Some(nodes) = nodes {
                            d.nodes = nodes;
                        }
                    })
                    .await
                })
                .await?;
            println!("updated function {name}");
            Ok(())
        }
        FnCommand::Pause(a) => {
            a.conn.run(async |client| edit(client, &a.name, |d| d.paused = true).await).await?;
            println!("paused function {}", a.name);
            Ok(())
        }
        FnCommand::Resume(a) => {
            a.conn.run(async |client| edit(client, &a.name, |d| d.paused = false).await).await?;
            println!("resumed function {}", a.name);
            Ok(())
        }
        FnCommand::Delete(a) => {
            a.conn
                .run(async |client| {
                    let (incarnation, _) = current(client, &a.name).await?;
                    let signed = client.sign(Body::Delete { incarnation }, super::access::now_ms())?;
                    Ok(client.catalogue_edit(signed).await?)
                })
                .await?;
            println!("deleted function {}", a.name);
            Ok(())
        }
    }
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
    /// Each line is `KEY<SEP>PAYLOAD`: the text before the first SEP is the message's key
    /// (an aggregate keeps its state per key). Without it messages have no key.
    #[arg(long)]
    key_sep: Option<char>,
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
fn test(a: TestArgs) -> anyhow::Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let wasm = std::fs::read(&a.wasm).with_context(|| format!("reading {}", a.wasm.display()))?;
    let module = Module::new(&wasm).with_context(|| a.wasm.display().to_string())?;
    rill_storage::name::check_part("function", &a.name)?;
    let limits = Limits { fuel_per_call: a.fuel, memory_bytes: a.memory_mib << 20, ..Limits::default() };
    let mut running = Running::start(&module, &a.params, limits).context("starting the module")?;
    print_logs(&mut running);
    let input = read_input(&a.input, a.key_sep)?;
    let local = NodeName::parse("local")?;
    let settings = Settings {
        name: a.name.clone(),
        deriver: Deriver::new(&a.name, 0),
        input_topic: 0,
        node: local.clone(),
        nodes: vec![local],
        retries_max: a.retries,
        incarnation: 0,
        progress_epoch: 0,
        progress_every_ms: u64::MAX,
    };
    let dead_letters = format!("fn.{}.dlq", a.name);
    let mut core = Core::new(settings, None, 0);
    let mut states = States::new();
    core.handle_log_grew();
    let (mut runs, started) = (0usize, Instant::now());
    while let Some(action) = core.poll_action() {
        match action {
            Action::ReadProgress => core.handle_progress(Default::default(), Default::default()),
            Action::Read { from } => {
                core.handle_read(input.iter().skip(from as usize).take(a.batch).cloned().collect());
            }
            Action::Run { inputs, states } => {
                let records: Vec<Input<'_>> = inputs.iter().map(Input::from).collect();
                let t = Instant::now();
                let result = running.process(&records, &states, a.outputs.len());
                let took = t.elapsed().as_secs_f64() * 1000.0;
                print_logs(&mut running);
                runs += 1;
                let (first, last) = (inputs[0].offset + 1, inputs[inputs.len() - 1].offset + 1);
                match &result {
                    Ok(ran) => eprintln!(
                        "run {runs}: lines {first}..={last}, {} out{}, {took:.3} ms",
                        ran.outputs.len(),
                        if ran.states.is_empty() {
                            String::new()
                        } else {
                            format!(", {} states changed", ran.states.len())
                        }
                    ),
                    Err(e) => eprintln!("run {runs}: lines {first}..={last} failed, {took:.3} ms: {e}"),
                }
                core.handle_run(result, 0);
            }
            Action::Write { messages } => {
                for (destination, m) in &messages {
                    let topic = match destination {
                        Destination::Output(i) => a.outputs[*i as usize].as_str(),
                        Destination::DeadLetter => dead_letters.as_str(),
                        Destination::Progress => continue,
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
            Action::Commit(checkpoint) => states = checkpoint.states.into_iter().collect(),
        }
    }
    let states: States = states;
    for (key, state) in &states {
        let key = key.as_deref().map_or("(no key)".into(), String::from_utf8_lossy);
        eprintln!("state of {key}: {} bytes", state.len());
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
fn read_input(path: &std::path::Path, key_sep: Option<char>) -> anyhow::Result<Vec<StoredMessage>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let name: std::sync::Arc<str> = path.file_name().map_or("input".into(), |n| n.to_string_lossy().into());
    let origin: std::sync::Arc<str> = "local".into();
    std::io::BufReader::new(file)
        .split(b'\n')
        .enumerate()
        .map(|(i, line)| {
            let mut payload = line.with_context(|| format!("reading {}", path.display()))?;
            let mut key = None;
            if let Some(sep) = key_sep {
                let mut buf = [0; 4];
                let sep = sep.encode_utf8(&mut buf).as_bytes();
                if let Some(at) = payload.windows(sep.len()).position(|w| w == sep) {
                    key = Some(payload[..at].to_vec());
                    payload.drain(..at + sep.len());
                }
            }
            let id = MessageId::chosen(std::sync::Arc::clone(&name), i as u64 + 1);
            let message = Message {
                id,
                origin: std::sync::Arc::clone(&origin),
                publish_time_ms: 0,
                key,
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
