//! Runs the functions this node should run: the I/O around [`super::core`].
//!
//! The supervisor watches the catalogue. A function runs here when it counts
//! ([`rill_replication::access::Access::functions`]), is not paused, names this node (or,
//! naming none, this node is in its first input namespace's clusters), and its module is
//! in the blob store. It gets one task per input topic, each with its own module instance
//! and core; a changed definition restarts them (an update keeps the incarnation, so the
//! cursors stay), a deleted one stops them. A task that stops on an error (a module that
//! will not start) stays stopped until the definition changes.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use rill_replication::{access::Incarnation, function::FunctionDef};
use rill_storage::{
    NodeName, StorageError, TopicName, keys, meta,
    topic::{AppendOutcome, OnConflict},
};
use tokio::task::JoinHandle;

use super::{
    abi::Input,
    core::{Action, Core, Counters, Destination, Settings},
    ids::Deriver,
    runtime::{FnError, Limits, Module, Running},
};
use crate::{authz::Authz, mesh::MeshHandle, protocol::FunctionStats, registry::Registry, topic::Topic};

/// Inputs read per batch.
const BATCH_MESSAGES_MAX: usize = 1024;
/// Input bytes read per batch.
const BATCH_BYTES_MAX: usize = 1 << 20;
/// Runs of an input that fails alone, after its first, before it is dead-lettered.
const RETRIES_MAX: u32 = 2;
/// How often the supervisor looks again without a catalogue change (a module may have
/// arrived).
const RECHECK: Duration = Duration::from_secs(2);
/// The wait before a failed write is tried again.
const WRITE_RETRY: Duration = Duration::from_secs(1);

/// What each task reports, for `rill stats`: per (function, input index).
#[derive(Default)]
pub(crate) struct Reports(Mutex<BTreeMap<(String, u32), Report>>);

struct Report {
    input: Arc<Topic>,
    counters: Counters,
    skipped_held: u64,
    cursor: u64,
    /// Microseconds per run of the module.
    runs: hdrhistogram::Histogram<u64>,
}

impl Reports {
    fn update(&self, key: &(String, u32), change: impl FnOnce(&mut Report)) {
        if let Some(r) = self.0.lock().expect("reports lock").get_mut(key) {
            change(r);
        }
    }

    /// Statistics of every function task `keep` says yes to (by function name). Reads
    /// the logs (the lag's age), so call it from blocking work.
    pub(crate) fn stats(&self, now_ms: u64, keep: impl Fn(&str) -> bool) -> Vec<FunctionStats> {
        let reports = self.0.lock().expect("reports lock");
        reports
            .iter()
            .filter(|((name, _), _)| keep(name))
            .map(|((name, _), r)| {
                let end = r.input.bounds().1;
                let oldest = r.input.publish_time_from(r.cursor);
                FunctionStats {
                    name: name.clone(),
                    input: r.input.name.to_string(),
                    processed: r.counters.processed,
                    emitted: r.counters.emitted,
                    filtered: r.counters.filtered,
                    failed: r.counters.failed,
                    dead_lettered: r.counters.dead_lettered,
                    skipped_held: r.skipped_held,
                    lag_messages: end.saturating_sub(r.cursor),
                    lag_ms: oldest.map_or(0, |t| now_ms.saturating_sub(t)),
                    run_p50_us: r.runs.value_at_quantile(0.5),
                    run_p99_us: r.runs.value_at_quantile(0.99),
                }
            })
            .collect()
    }
}

/// A function's tasks on this node.
struct Runner {
    incarnation: Incarnation,
    def: FunctionDef,
    tasks: Vec<JoinHandle<()>>,
}

impl Runner {
    fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Runs until the node closes.
pub(crate) async fn supervise(
    registry: Arc<Registry>,
    authz: Arc<Authz>,
    mesh: MeshHandle,
    node: NodeName,
    reports: Arc<Reports>,
) {
    let mut changes = authz.changes();
    let mut runners: BTreeMap<String, Runner> = BTreeMap::new();
    let mut waiting_for: BTreeMap<String, [u8; 32]> = BTreeMap::new();
    loop {
        if registry.is_closing() {
            runners.values().for_each(Runner::stop);
            return;
        }
        let config = mesh.config().await;
        let wanted: BTreeMap<String, (Incarnation, FunctionDef, Vec<NodeName>)> = authz
            .functions()
            .into_iter()
            .map(|(name, (i, def))| {
                let nodes = nodes_of(&def, &config, &node);
                (name, (i, def, nodes))
            })
            .filter(|(_, (_, def, nodes))| !def.paused && nodes.contains(&node))
            .collect();
        runners.retain(|name, r| {
            let keep = wanted.get(name).is_some_and(|(i, d, _)| *i == r.incarnation && *d == r.def);
            if !keep {
                tracing::info!(function = %name, "stopping function");
                r.stop();
                reports.0.lock().expect("reports lock").retain(|(n, _), _| n != name);
            }
            keep
        });
        for (name, (incarnation, def, nodes)) in wanted {
            if runners.contains_key(&name) {
                continue;
            }
            let blobs = registry.blobs.clone();
            let module = registry.env.run_blocking(move || blobs.get(&def.module)).await;
            let wasm = match module {
                Ok(Some(wasm)) => wasm,
                Ok(None) => {
                    if waiting_for.insert(name.clone(), def.module) != Some(def.module) {
                        tracing::info!(function = %name, "waiting for the function's module to reach this node");
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(function = %name, error = %e, "cannot read the function's module");
                    continue;
                }
            };
            waiting_for.remove(&name);
            tracing::info!(function = %name, incarnation = %incarnation, "starting function");
            let tasks = start(&registry, &node, nodes, incarnation, &def, &wasm, &reports);
            runners.insert(name, Runner { incarnation, def, tasks });
        }
        // Look again at the next catalogue change; while a module is awaited, also
        // every RECHECK (blobs arrive without a catalogue change).
        if waiting_for.is_empty() {
            if changes.changed().await.is_err() {
                return;
            }
        } else {
            tokio::select! {
                _ = changes.changed() => {}
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

/// The nodes a function runs on, in name order: those it names, else its first input
/// namespace's clusters; a namespace without clusters is this node's alone.
fn nodes_of(def: &FunctionDef, config: &rill_replication::namespace::ConfigDoc, node: &NodeName) -> Vec<NodeName> {
    let nodes = def.nodes.clone().unwrap_or_else(|| {
        let first = def.inputs.first().and_then(|t| TopicName::parse(t).ok()).map(|t| t.namespace_name());
        let clusters = first.and_then(|ns| config.get(ns.as_str()).map(|p| p.clusters.val.clone()));
        clusters.filter(|c| !c.is_empty()).unwrap_or_else(|| [node.clone()].into())
    });
    nodes.into_iter().collect()
}

fn start(
    registry: &Arc<Registry>,
    node: &NodeName,
    nodes: Vec<NodeName>,
    incarnation: Incarnation,
    def: &FunctionDef,
    wasm: &[u8],
    reports: &Arc<Reports>,
) -> Vec<JoinHandle<()>> {
    let module = match Module::new(wasm) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(function = %def.name, error = %e, "function stopped: its module does not load");
            return Vec::new();
        }
    };
    (0..def.inputs.len() as u32)
        .map(|input| {
            let settings = Settings {
                name: def.name.clone(),
                deriver: Deriver::new(def.short_name(), incarnation.0),
                input_topic: input,
                node: node.clone(),
                nodes: nodes.clone(),
                retries_max: RETRIES_MAX,
            };
            let task = Task {
                registry: Arc::clone(registry),
                def: def.clone(),
                incarnation,
                settings,
                reports: Arc::clone(reports),
            };
            tokio::spawn(task.run(module.clone()))
        })
        .collect()
}

/// What a function's task stores after each batch, under
/// [`keys::function_cursor`]: its position in the input and, for an aggregate, every
/// key's state as of that position. One record, so the two never disagree after a crash.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    cursor: u64,
    states: Vec<(super::abi::StateKey, Vec<u8>)>,
}

/// One function over one of its input topics.
struct Task {
    registry: Arc<Registry>,
    def: FunctionDef,
    incarnation: Incarnation,
    settings: Settings,
    reports: Arc<Reports>,
}

impl Task {
    async fn run(self, module: Module) {
        if let Err(e) = self.serve(module).await {
            tracing::error!(function = %self.def.name, input = self.settings.input_topic, error = %e, "function stopped");
        }
    }

    async fn serve(&self, module: Module) -> Result<(), String> {
        let registry = &self.registry;
        let input_name = &self.def.inputs[self.settings.input_topic as usize];
        let input = TopicName::parse(input_name).map_err(|e| e.to_string())?;
        let topic = registry.topic(&input).await.map_err(|e| e.to_string())?;
        let key = keys::function_cursor(&self.def.name, self.incarnation.0, self.settings.input_topic);
        let saved = meta::get_record::<Checkpoint>(registry.meta.as_ref(), &key).map_err(|e| e.to_string())?;
        let Checkpoint { cursor, states } = saved.unwrap_or_else(|| {
            let cursor = match self.def.start {
                rill_replication::function::Start::Earliest => 0,
                rill_replication::function::Start::Latest => topic.bounds().1,
            };
            Checkpoint { cursor, states: Vec::new() }
        });
        let params = self.def.params.clone();
        let mut running = registry
            .env
            .run_blocking(move || Running::start(&module, &params, Limits::default()))
            .await
            .map_err(|e| format!("its module does not start: {e}"))?;
        let mut committed = topic.committed();
        let report_key = (self.def.name.clone(), self.settings.input_topic);
        let report = Report {
            input: Arc::clone(&topic),
            counters: Counters::default(),
            skipped_held: 0,
            cursor,
            runs: hdrhistogram::Histogram::new(3).map_err(|e| e.to_string())?,
        };
        self.reports.0.lock().expect("reports lock").insert(report_key.clone(), report);
        let mut core = Core::new(self.settings.clone(), cursor, states.into_iter().collect());
        core.handle_log_grew();
        loop {
            if registry.is_closing() {
                return Ok(());
            }
            let Some(action) = core.poll_action() else {
                // Caught up: wait for the input to grow.
                if committed.changed().await.is_err() {
                    return Ok(());
                }
                core.handle_log_grew();
                continue;
            };
            match action {
                Action::Read { from } => {
                    let read =
                        topic.read(from, BATCH_MESSAGES_MAX, BATCH_BYTES_MAX).await.map_err(|e| e.to_string())?;
                    core.handle_read(read);
                }
                Action::Run { inputs, states } => {
                    let started = std::time::Instant::now();
                    let (result, back) = self.process(running, inputs, states).await;
                    running = back;
                    let took = started.elapsed().as_micros() as u64;
                    self.reports.update(&report_key, |r| {
                        let _ = r.runs.record(took.max(1));
                    });
                    let now_ms = registry.env.clock.now_ms();
                    if let Err(e) = &result {
                        tracing::info!(function = %self.def.name, error = %e, "function run failed");
                    }
                    core.handle_run(result, now_ms);
                }
                Action::Write { messages } => {
                    let written = self.write(messages).await.map(|held| {
                        self.reports.update(&report_key, |r| r.skipped_held += held);
                    });
                    if let Err(e) = &written {
                        tracing::warn!(function = %self.def.name, error = %e, "writing the function's outputs failed; retrying");
                        tokio::time::sleep(WRITE_RETRY).await;
                    }
                    core.handle_written(written);
                }
                Action::Commit { offset, states } => {
                    let checkpoint = Checkpoint { cursor: offset, states: states.into_iter().collect() };
                    meta::put_record(registry.meta.as_ref(), &key, &checkpoint).map_err(|e| e.to_string())?;
                    let counters = core.counters();
                    self.reports.update(&report_key, |r| {
                        r.cursor = offset;
                        r.counters = counters;
                    });
                }
            }
        }
    }

    /// Runs the module over `inputs` off the async threads; hands the instance back.
    async fn process(
        &self,
        mut running: Running,
        inputs: Vec<rill_storage::StoredMessage>,
        states: super::core::States,
    ) -> (Result<super::runtime::Ran, FnError>, Running) {
        let topics = self.def.outputs.len();
        self.registry
            .env
            .run_blocking(move || {
                let records: Vec<Input<'_>> = inputs.iter().map(Input::from).collect();
                let result = running.process(&records, &states, topics);
                let (lines, dropped) = running.take_logs();
                for line in lines {
                    tracing::info!(target: "rill::function", "{line}");
                }
                if dropped > 0 {
                    tracing::info!(target: "rill::function", dropped, "more guest log lines dropped");
                }
                (result, running)
            })
            .await
    }

    /// Stores outputs and dead letters durably, per destination topic; an id already held
    /// (a re-run) is skipped. Returns how many were.
    async fn write(&self, messages: Vec<(Destination, rill_storage::Message)>) -> Result<u64, String> {
        let mut held = 0;
        let mut by_topic: BTreeMap<String, Vec<rill_storage::Message>> = BTreeMap::new();
        for (destination, m) in messages {
            let topic = match destination {
                Destination::Output(i) => self.def.outputs[i as usize].clone(),
                Destination::DeadLetter => self.def.dead_letter_topic(),
            };
            by_topic.entry(topic).or_default().push(m);
        }
        for (name, batch) in by_topic {
            let name = TopicName::parse(&name).map_err(|e| e.to_string())?;
            let topic = self.registry.topic(&name).await.map_err(|e: StorageError| e.to_string())?;
            let reply = topic.append(batch, OnConflict::SetAside).await.ok_or("the topic is closing")?;
            let appended = reply.await.map_err(|_| "the write was abandoned".to_string())?;
            let outcomes = appended.result.map_err(|e| e.to_string())?;
            held += outcomes.iter().filter(|o| !matches!(o, AppendOutcome::Appended { .. })).count() as u64;
            if !appended.set_aside.is_empty() {
                // A re-run that gave other contents: the function is not deterministic.
                tracing::warn!(
                    function = %self.def.name,
                    topic = %name,
                    outputs = appended.set_aside.len(),
                    "outputs of a re-run differ from those stored under the same ids; the stored ones stay"
                );
            }
        }
        Ok(held)
    }
}
