//! Runs the functions this node should run: the I/O around [`super::core`].
//!
//! The supervisor watches the catalogue. A function runs here when it counts
//! ([`rill_replication::access::Access::functions`]), is not paused, names this node (or,
//! naming none, this node is in its first input namespace's clusters), and its module is
//! in the blob store. It gets one task per input topic, each with its own module instance
//! and core; a changed definition or a change of its nodes (its clusters, when it names
//! none) restarts them (an update keeps the incarnation, so the cursors stay; the core
//! takes over what the new nodes give this one), a deleted one stops them. A task that stops on an error (a module that
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
    core::{Action, Checkpoint, Core, Counters, Destination, Settings},
    ids::Deriver,
    progress::{Covered, Record},
    runtime::{FnError, Limits, Module, Running},
};
use crate::{authz::Authz, mesh::MeshHandle, protocol::FunctionStats, registry::Registry, topic::Topic};

/// Inputs read per batch.
const BATCH_MESSAGES_MAX: usize = 1024;
/// Input bytes read per batch.
const BATCH_BYTES_MAX: usize = 1 << 20;
/// Runs of an input that fails alone, after its first, before it is dead-lettered.
const RETRIES_MAX: u32 = 2;
/// At most one progress record per this long (see `progress`).
const PROGRESS_EVERY_MS: u64 = 1000;
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
    /// The nodes it runs on (ownership is decided among them).
    nodes: Vec<NodeName>,
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
            // A change of nodes restarts the tasks: ownership moves (see `core`).
            let keep = wanted.get(name).is_some_and(|(i, d, n)| *i == r.incarnation && *d == r.def && *n == r.nodes);
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
            let tasks = start(&registry, &node, nodes.clone(), incarnation, &def, &wasm, &reports);
            runners.insert(name, Runner { incarnation, def, nodes, tasks });
        }
        // Look again at the next catalogue change; while a module is awaited, also
        // every RECHECK (blobs arrive without a catalogue change).
        if waiting_for.is_empty() {
            if changes.changed().await.is_err() {
                return;
            }
        } else {
            // Biased: the simulation needs the same choice on every run.
            tokio::select! {
                biased;
                _ = changes.changed() => {}
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

/// Per input topic, the lowest position of the functions that run on `node` over it,
/// paused or not: retention keeps everything from there (DESIGN section 8: an input is
/// never deleted before its function has processed it). `cursor` reads a task's stored
/// checkpoint; a task that never stored one needs its whole input.
pub(crate) fn inputs_needed(
    functions: &BTreeMap<String, (Incarnation, FunctionDef)>,
    config: &rill_replication::namespace::ConfigDoc,
    node: &NodeName,
    cursor: impl Fn(&str) -> Option<u64>,
) -> BTreeMap<TopicName, u64> {
    let mut needed: BTreeMap<TopicName, u64> = BTreeMap::new();
    for (incarnation, def) in functions.values() {
        if !nodes_of(def, config, node).contains(node) {
            continue;
        }
        for (i, input) in def.inputs.iter().enumerate() {
            let Ok(topic) = TopicName::parse(input) else { continue };
            let at = cursor(&keys::function_cursor(&def.name, incarnation.0, i as u32)).unwrap_or(0);
            let entry = needed.entry(topic).or_insert(u64::MAX);
            *entry = (*entry).min(at);
        }
    }
    needed
}

/// A task's stored position, for [`inputs_needed`] (`None`: none stored, or unreadable).
pub(crate) fn stored_cursor(meta: &dyn meta::MetaStore, key: &str) -> Option<u64> {
    meta::get_record::<Checkpoint>(meta, key)
        .ok()
        .flatten()
        .map(|c| c.takeover.map_or(c.cursor, |t| t.from.min(c.cursor)))
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
                incarnation: incarnation.0,
                progress_epoch: registry.env.random.next_u64(),
                progress_every_ms: PROGRESS_EVERY_MS,
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
        let start = match self.def.start {
            rill_replication::function::Start::Earliest => 0,
            rill_replication::function::Start::Latest => topic.bounds().1,
        };
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
            cursor: saved.as_ref().map_or(start, |c| c.cursor),
            runs: hdrhistogram::Histogram::new(3).map_err(|e| e.to_string())?,
        };
        self.reports.0.lock().expect("reports lock").insert(report_key.clone(), report);
        let mut core = Core::new(self.settings.clone(), saved, start);
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
                Action::ReadProgress => {
                    let (here, others) = self.read_progress().await?;
                    core.handle_progress(here, others);
                }
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
                Action::Commit(checkpoint) => {
                    meta::put_record(registry.meta.as_ref(), &key, &checkpoint).map_err(|e| e.to_string())?;
                    let offset = checkpoint.cursor;
                    let counters = core.counters();
                    self.reports.update(&report_key, |r| {
                        r.cursor = offset;
                        r.counters = counters;
                    });
                }
            }
        }
    }

    /// The ids the progress records of this incarnation cover for this task's input
    /// topic: this node's, and other nodes'. A record that does not decode is logged and
    /// left out (its inputs are processed again, under the same derived ids).
    async fn read_progress(&self) -> Result<(Covered, Covered), String> {
        let name = TopicName::parse(&self.def.progress_topic()).map_err(|e| e.to_string())?;
        let topic = self.registry.topic(&name).await.map_err(|e| e.to_string())?;
        let (mut here, mut others) = (Covered::default(), Covered::default());
        let (mut from, end) = (topic.bounds().0, topic.bounds().1);
        while from < end {
            let read = topic.read(from, BATCH_MESSAGES_MAX, BATCH_BYTES_MAX).await.map_err(|e| e.to_string())?;
            let Some(last) = read.last() else { break };
            from = last.offset + 1;
            for m in read {
                match Record::decode(&m.message.payload) {
                    Ok(r) if r.input == self.settings.input_topic && r.incarnation == self.incarnation.0 => {
                        let mine = r.node == self.settings.node.as_str();
                        if mine { &mut here } else { &mut others }.extend(&r.processed);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(function = %self.def.name, offset = m.offset, error = %e, "skipping a progress record")
                    }
                }
            }
        }
        Ok((here, others))
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

    /// Stores outputs and dead letters durably, per destination topic, and only then the
    /// progress record (it must never name inputs whose outputs are not on disk); an
    /// output already held (a re-run) is skipped. Returns how many were.
    async fn write(&self, messages: Vec<(Destination, rill_storage::Message)>) -> Result<u64, String> {
        let mut held = 0;
        let mut by_topic: BTreeMap<String, Vec<rill_storage::Message>> = BTreeMap::new();
        let mut progress = Vec::new();
        let mut messages = messages;
        if self.registry.env.bugs.fn_drop_output
            && let Some(i) = messages.iter().position(|(d, _)| matches!(d, Destination::Output(_)))
        {
            messages.remove(i);
        }
        for (destination, m) in messages {
            let topic = match destination {
                Destination::Output(i) => self.def.outputs[i as usize].clone(),
                Destination::DeadLetter => self.def.dead_letter_topic(),
                Destination::Progress => {
                    progress.push(m);
                    continue;
                }
            };
            by_topic.entry(topic).or_default().push(m);
        }
        let last = (!progress.is_empty()).then(|| (self.def.progress_topic(), progress));
        for (name, batch) in by_topic.into_iter().chain(last) {
            let is_progress = name == self.def.progress_topic();
            let name = TopicName::parse(&name).map_err(|e| e.to_string())?;
            let topic = self.registry.topic(&name).await.map_err(|e: StorageError| e.to_string())?;
            let reply = topic.append(batch, OnConflict::SetAside).await.ok_or("the topic is closing")?;
            let appended = reply.await.map_err(|_| "the write was abandoned".to_string())?;
            let outcomes = appended.result.map_err(|e| e.to_string())?;
            if !is_progress {
                held += outcomes.iter().filter(|o| !matches!(o, AppendOutcome::Appended { .. })).count() as u64;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, input: &str, nodes: &[&str], paused: bool) -> FunctionDef {
        FunctionDef {
            name: name.into(),
            module: [0; 32],
            inputs: vec![input.into()],
            outputs: vec!["t/n/out".into()],
            nodes: Some(nodes.iter().map(|n| NodeName::parse(n).unwrap()).collect()),
            start: rill_replication::function::Start::Earliest,
            params: Vec::new(),
            paused,
        }
    }

    #[test]
    fn retention_waits_for_every_function_running_here_paused_or_not() {
        let functions: BTreeMap<String, (Incarnation, FunctionDef)> = [
            ("t/n/f1", 1, def("t/n/f1", "t/n/x", &["a", "b"], false)),
            ("t/n/f2", 2, def("t/n/f2", "t/n/x", &["c"], false)),
            ("t/n/f3", 3, def("t/n/f3", "t/n/y", &["a"], true)),
        ]
        .into_iter()
        .map(|(n, i, d)| (n.to_string(), (Incarnation(i), d)))
        .collect();
        let stored = BTreeMap::from([(keys::function_cursor("t/n/f1", 1, 0), 50u64)]);
        let cursor = |key: &str| stored.get(key).copied();
        let config = rill_replication::namespace::ConfigDoc::default();
        let topic = |t: &str| TopicName::parse(t).unwrap();
        let on_a = inputs_needed(&functions, &config, &NodeName::parse("a").unwrap(), cursor);
        assert_eq!(
            on_a,
            BTreeMap::from([(topic("t/n/x"), 50), (topic("t/n/y"), 0)]),
            "f3 is paused and has run nowhere yet"
        );
        let on_c = inputs_needed(&functions, &config, &NodeName::parse("c").unwrap(), cursor);
        assert_eq!(on_c, BTreeMap::from([(topic("t/n/x"), 0)]), "f2 has stored no position on c");
        let on_d = inputs_needed(&functions, &config, &NodeName::parse("d").unwrap(), cursor);
        assert!(on_d.is_empty(), "no function runs on d");
    }

    #[test]
    fn a_stored_position_is_the_lower_of_the_cursor_and_a_takeover_pass() {
        let meta = rill_storage::meta::MemMeta::default();
        let mut c = Checkpoint { cursor: 90, ..Checkpoint::default() };
        meta::put_record(&meta, "k", &c).unwrap();
        assert_eq!(stored_cursor(&meta, "k"), Some(90));
        c.takeover = Some(super::super::core::Takeover { from: 10, until: 90 });
        meta::put_record(&meta, "k", &c).unwrap();
        assert_eq!(stored_cursor(&meta, "k"), Some(10));
        assert_eq!(stored_cursor(&meta, "none"), None);
    }
}
