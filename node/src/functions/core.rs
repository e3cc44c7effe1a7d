//! The operator core: one function on one node over one of its input topics, without I/O
//! (DESIGN section 8: input batch in, outputs and cursor commits out). The driver reads
//! the log, runs the module, writes through the produce path and stores the cursor; this
//! decides what happens, in this order, so that every owned input's outputs are stored
//! exactly once whatever crashes:
//!
//! 1. `Read` from the committed cursor; the batch that comes back keeps only the inputs
//!    this node owns ([`owner`]) that no progress record covers (see below).
//! 2. `Run` the function over them. If the batch fails, each input runs alone, so one bad
//!    input cannot hold the others back; an input that fails alone is run again up to
//!    `retries_max` times, then dead-lettered.
//! 3. `Write` the outputs under ids derived from their inputs ([`super::ids`]), the
//!    dead letters (under derived ids too) and a progress record naming the inputs
//!    processed ([`super::progress`]), durably.
//! 4. Only then `Commit` the cursor past the batch, with an aggregate's states as they
//!    stand after it (one record, so the two never disagree).
//!
//! A crash anywhere before 4 runs the batch again after the restart; its outputs carry
//! the same ids, so the log stores them once (the driver writes with "skip held ids"). An
//! aggregate runs it again from the states committed with the cursor, so a deterministic
//! guest gives the same outputs.
//! When ownership may have moved (the function's nodes differ from those the checkpoint
//! was made with, or the function starts here for the first time), the core first asks
//! for every progress record (`ReadProgress`) and skips the inputs they cover. After a
//! change of nodes it also makes a *takeover* pass over the inputs below its cursor, for
//! those it owns now that no record covers (inputs of a node that left, or of this node
//! when another processed them until now); the pass's position is in the checkpoint, so a
//! crash resumes it. Inputs processed twice around a change (a record not yet replicated
//! here) get the same derived ids, so a deterministic function stores them once.
//!
//! Call contract: after each `handle_*`, take every action with [`Core::poll_action`] and
//! answer `ReadProgress`, `Read`, `Run` and `Write` with the matching `handle_*` call;
//! `Commit` needs no answer (a lost commit only repeats work).
use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use rill_storage::{Message, NodeName, StoredMessage};
use serde::{Deserialize, Serialize};

use super::{
    abi::StateKey,
    ids::Deriver,
    progress::{Covered, Record},
    runtime::{FnError, Ran},
};

/// The most state an aggregate may keep over all keys of one input topic, bytes: it is
/// written whole with every cursor commit.
pub(crate) const STATES_BYTES_MAX: usize = 16 << 20;

/// An aggregate's states, by key.
pub(crate) type States = BTreeMap<StateKey, Vec<u8>>;

/// The output rank a dead letter's id is derived with: no input has that many outputs.
const DEAD_LETTER_RANK: u32 = u32::MAX;

/// Headers a dead letter carries besides the input's own.
pub(crate) const HEADER_FUNCTION: &str = "rill-fn";
/// Why the input was dead-lettered.
pub(crate) const HEADER_REASON: &str = "rill-fn-reason";
/// The input's id.
pub(crate) const HEADER_INPUT: &str = "rill-fn-input";

/// The node that processes a message from `origin` among the function's `nodes` (sorted):
/// its origin if the function runs there, else the first node in name order.
pub(crate) fn owner<'a>(origin: &str, nodes: &'a [NodeName]) -> Option<&'a NodeName> {
    nodes.iter().find(|n| n.as_str() == origin).or_else(|| nodes.first())
}

/// What a key's state counts against [`STATES_BYTES_MAX`].
fn state_bytes(key: &StateKey, state: &[u8]) -> usize {
    key.as_ref().map_or(0, Vec::len) + state.len()
}

/// Where a written message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Destination {
    /// The function's output topic with this index.
    Output(u32),
    /// The function's dead-letter topic.
    DeadLetter,
    /// The function's progress topic.
    Progress,
}

/// What a task stores after each batch, in one record: its position in the input, an
/// aggregate's states as of that position, the nodes ownership was decided with, and an
/// unfinished takeover pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    /// Every input below this is done.
    pub(crate) cursor: u64,
    /// Every key's state (empty unless the function is an aggregate).
    pub(crate) states: Vec<(StateKey, Vec<u8>)>,
    /// The function's nodes when this was written.
    pub(crate) nodes: Vec<NodeName>,
    /// A takeover pass under way.
    pub(crate) takeover: Option<Takeover>,
}

/// A pass over inputs below the cursor for those this node owns since its function's
/// nodes changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Takeover {
    /// The next offset to look at.
    pub(crate) from: u64,
    /// Where the pass ends (the cursor when it began).
    pub(crate) until: u64,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Read every record of the function's progress topic and answer with the ids they
    /// cover for this input topic ([`Core::handle_progress`]).
    ReadProgress,
    /// Read input messages from this offset on; answer with [`Core::handle_read`].
    Read {
        /// The first offset wanted.
        from: u64,
    },
    /// Run the function over these inputs; answer with [`Core::handle_run`].
    Run {
        /// The inputs, in log order.
        inputs: Vec<StoredMessage>,
        /// An aggregate's state of each of their keys that has one, as it stands before them.
        states: States,
    },
    /// Store these messages durably (skipping ids already held); answer with
    /// [`Core::handle_written`].
    Write {
        /// Each message and its destination.
        messages: Vec<(Destination, Message)>,
    },
    /// Persist the checkpoint (one record).
    Commit(Checkpoint),
}

/// The core's settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The function's name (for dead-letter headers).
    pub(crate) name: String,
    /// Derives output ids.
    pub(crate) deriver: Deriver,
    /// The index of this core's input topic among the function's inputs.
    pub(crate) input_topic: u32,
    /// This node.
    pub(crate) node: NodeName,
    /// The function's nodes, sorted by name.
    pub(crate) nodes: Vec<NodeName>,
    /// Runs of an input that fails alone after its first, before it is dead-lettered.
    pub(crate) retries_max: u32,
    /// The function's incarnation, named in progress records.
    pub(crate) incarnation: u64,
    /// The epoch of this run's progress records (drawn when the task starts).
    pub(crate) progress_epoch: u64,
    /// At most one progress record per this many milliseconds (and one when caught up):
    /// a record costs a sync of the progress topic.
    pub(crate) progress_every_ms: u64,
}

/// Counters for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Inputs the function processed (owned, run and written).
    pub(crate) processed: u64,
    /// Outputs written.
    pub(crate) emitted: u64,
    /// Inputs that produced no output.
    pub(crate) filtered: u64,
    /// Failed runs (of a batch, or of an input alone).
    pub(crate) failed: u64,
    /// Inputs dead-lettered.
    pub(crate) dead_lettered: u64,
    /// Inputs another node owns.
    pub(crate) not_owned: u64,
    /// Inputs a progress record covers (another node, or this one before a takeover,
    /// processed them).
    pub(crate) covered: u64,
}

/// The batch in progress.
#[derive(Debug)]
struct Batch {
    /// The owned inputs.
    inputs: Vec<StoredMessage>,
    /// One past the last offset read (owned or not).
    end: u64,
    /// `None` while the batch runs whole; else the next input to run alone.
    single: Option<usize>,
    /// Runs of the current single input so far.
    attempts: u32,
    /// What to write once every input is settled.
    writes: Vec<(Destination, Message)>,
    /// Inputs settled so far with outputs, and with none.
    emitted: u64,
    filtered: u64,
    /// State changes of the inputs settled so far (`None`: forgotten).
    changed: BTreeMap<StateKey, Option<Vec<u8>>>,
}

impl Batch {
    /// The state of each key of `inputs`, committed then changed by this batch so far.
    fn states_for(&self, committed: &States, inputs: &[StoredMessage]) -> States {
        let mut out = States::new();
        for m in inputs {
            let key = m.message.key.clone();
            let state = match self.changed.get(&key) {
                Some(changed) => changed.clone(),
                None => committed.get(&key).cloned(),
            };
            if let Some(state) = state {
                out.insert(key, state);
            }
        }
        out
    }
}

#[derive(Debug)]
enum State {
    /// Waiting for the answer to a `ReadProgress`.
    ReadingProgress,
    /// Waiting for the answer to a `Read`.
    Reading,
    /// Read everything there was; waiting for the log to grow.
    CaughtUp,
    /// Waiting for the answer to a `Run`.
    Running(Batch),
    /// Waiting for the answer to a `Write`; then commit `end`.
    Writing(Batch),
}

/// One function over one input topic on one node.
#[derive(Debug)]
pub(crate) struct Core {
    settings: Settings,
    /// Every input below this is done (committed or about to be).
    cursor: u64,
    /// An aggregate's states as of `cursor`, and their size.
    states: States,
    states_bytes: usize,
    /// A takeover pass under way.
    takeover: Option<Takeover>,
    /// Before the first read: ask for the progress records first.
    needs_progress: bool,
    /// The ids other nodes' progress records cover (empty unless they were asked for).
    covered: Covered,
    /// The ids this node's own records cover; they count only below the cursor.
    covered_here: Covered,
    /// The next progress record's seq.
    progress_seq: u64,
    /// Inputs processed and written since the last progress record.
    unrecorded: Covered,
    /// When the last progress record was written, and the latest time seen.
    recorded_ms: u64,
    now_ms: u64,
    state: State,
    actions: VecDeque<Action>,
    counters: Counters,
    /// This node's name as stamped on outputs.
    origin: Arc<str>,
}

impl Core {
    /// A core resuming from the committed `cursor`. It reads once told the log may hold
    /// something ([`Core::handle_log_grew`]; the driver says so at start).
    /// A core resuming from its `saved` checkpoint, or starting at offset `start` when it
    /// has none.
    pub(crate) fn new(settings: Settings, saved: Option<Checkpoint>, start: u64) -> Core {
        let origin = settings.node.as_str().into();
        let (checkpoint, needs_progress) = match saved {
            // First start here: another node may have processed what this one owns.
            None => (Checkpoint { cursor: start, ..Checkpoint::default() }, true),
            Some(mut c) if c.nodes != settings.nodes => {
                if c.cursor > 0 {
                    c.takeover = Some(Takeover { from: 0, until: c.cursor });
                }
                (c, true)
            }
            Some(c) => {
                let pending = c.takeover.is_some();
                (c, pending)
            }
        };
        let states: States = checkpoint.states.into_iter().collect();
        let states_bytes = states.iter().map(|(k, v)| state_bytes(k, v)).sum();
        Core {
            settings,
            cursor: checkpoint.cursor,
            states,
            states_bytes,
            takeover: checkpoint.takeover,
            needs_progress,
            covered: Covered::default(),
            covered_here: Covered::default(),
            progress_seq: 0,
            unrecorded: Covered::default(),
            recorded_ms: 0,
            now_ms: 0,
            state: State::CaughtUp,
            actions: VecDeque::new(),
            counters: Counters::default(),
            origin,
        }
    }

    /// The next action for the driver.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The counters since start.
    pub(crate) fn counters(&self) -> Counters {
        self.counters
    }

    /// The input log grew (or the driver started): read if everything was read.
    pub(crate) fn handle_log_grew(&mut self) {
        if !matches!(self.state, State::CaughtUp) {
            return;
        }
        if self.needs_progress {
            self.state = State::ReadingProgress;
            self.actions.push_back(Action::ReadProgress);
            return;
        }
        self.state = State::Reading;
        self.actions.push_back(Action::Read { from: self.position() });
    }

    /// The answer to `ReadProgress`: the ids the function's progress records (of this
    /// incarnation) cover for this input topic: this node's, and other nodes'.
    pub(crate) fn handle_progress(&mut self, here: Covered, others: Covered) {
        if !matches!(self.state, State::ReadingProgress) {
            return;
        }
        self.covered_here = here;
        self.covered = others;
        self.needs_progress = false;
        self.state = State::Reading;
        self.actions.push_back(Action::Read { from: self.position() });
    }

    /// Where the next read starts: in the takeover pass, else at the cursor.
    fn position(&self) -> u64 {
        self.takeover.map_or(self.cursor, |t| t.from)
    }

    /// The answer to `Read`: the messages from the cursor on (empty: nothing new).
    pub(crate) fn handle_read(&mut self, mut read: Vec<StoredMessage>) {
        if let Some(t) = self.takeover {
            read.retain(|m| m.offset < t.until);
            if read.is_empty() {
                // The pass is over: on from the cursor.
                self.takeover = None;
                return self.commit(self.cursor);
            }
        }
        let Some(last) = read.last() else {
            if let Some(record) = self.progress_record() {
                // Caught up: record what is not recorded yet.
                return self.write_progress(record);
            }
            self.state = State::CaughtUp;
            return;
        };
        let end = last.offset + 1;
        let node = &self.settings.node;
        let (owned, others): (Vec<_>, Vec<_>) =
            read.into_iter().partition(|m| owner(&m.message.origin, &self.settings.nodes) == Some(node));
        self.counters.not_owned += others.len() as u64;
        let cursor = self.cursor;
        let is_covered = |m: &StoredMessage| {
            let id = &m.message.id;
            self.covered.contains(id) || (m.offset < cursor && self.covered_here.contains(id))
        };
        let (covered, inputs): (Vec<_>, Vec<_>) = owned.into_iter().partition(is_covered);
        self.counters.covered += covered.len() as u64;
        let batch = Batch {
            inputs,
            end,
            single: None,
            attempts: 0,
            writes: Vec::new(),
            emitted: 0,
            filtered: 0,
            changed: BTreeMap::new(),
        };
        if batch.inputs.is_empty() {
            return self.commit(batch.end);
        }
        let states = batch.states_for(&self.states, &batch.inputs);
        self.actions.push_back(Action::Run { inputs: batch.inputs.clone(), states });
        self.state = State::Running(batch);
    }

    /// The answer to `Run`, at `now_ms` (the outputs' publish time).
    pub(crate) fn handle_run(&mut self, result: Result<Ran, FnError>, now_ms: u64) {
        let State::Running(mut batch) = std::mem::replace(&mut self.state, State::Reading) else { return };
        self.now_ms = self.now_ms.max(now_ms);
        let result = result.and_then(|ran| self.check_states(&batch, ran));
        match (batch.single, result) {
            (None, Ok(ran)) => {
                let all: Vec<usize> = (0..batch.inputs.len()).collect();
                self.settle(&mut batch, &all, ran, now_ms);
                self.write(batch);
            }
            (None, Err(_)) if batch.inputs.len() > 1 => {
                // One input may be to blame: run each alone.
                self.counters.failed += 1;
                batch.single = Some(0);
                self.run_single(batch);
            }
            (single, Ok(ran)) => {
                let i = single.unwrap_or(0);
                self.settle(&mut batch, &[i], ran, now_ms);
                self.next_single(batch, i);
            }
            (single, Err(e)) => {
                let i = single.unwrap_or(0);
                self.counters.failed += 1;
                batch.single = Some(i);
                batch.attempts += 1;
                if batch.attempts <= self.settings.retries_max {
                    return self.run_single(batch);
                }
                let letter = self.dead_letter(&batch.inputs[i], &e, now_ms);
                batch.writes.push((Destination::DeadLetter, letter));
                self.counters.dead_lettered += 1;
                self.next_single(batch, i);
            }
        }
    }

    /// The answer to `Write`: on success the batch is done and the cursor moves; on
    /// failure the same write is asked for again (the driver waits before it retries).
    pub(crate) fn handle_written(&mut self, result: Result<(), String>) {
        let State::Writing(batch) = std::mem::replace(&mut self.state, State::Reading) else { return };
        if result.is_err() {
            self.actions.push_back(Action::Write { messages: batch.writes.clone() });
            self.state = State::Writing(batch);
            return;
        }
        self.counters.processed += batch.inputs.len() as u64;
        self.counters.emitted += batch.emitted;
        self.counters.filtered += batch.filtered;
        for (key, state) in batch.changed {
            self.states_bytes -= self.states.get(&key).map_or(0, |v| state_bytes(&key, v));
            match state {
                Some(s) => {
                    self.states_bytes += state_bytes(&key, &s);
                    self.states.insert(key, s);
                }
                None => {
                    self.states.remove(&key);
                }
            }
        }
        self.commit(batch.end);
    }

    /// A run whose states would take the input's states past [`STATES_BYTES_MAX`] fails.
    fn check_states(&self, batch: &Batch, ran: Ran) -> Result<Ran, FnError> {
        if ran.states.is_empty() {
            return Ok(ran);
        }
        let mut after: BTreeMap<&StateKey, usize> = BTreeMap::new();
        for (key, state) in
            batch.changed.iter().map(|(k, s)| (k, s.as_ref())).chain(ran.states.iter().map(|(k, s)| (k, s.as_ref())))
        {
            after.insert(key, state.map_or(0, |s| state_bytes(key, s)));
        }
        let before: usize = after.keys().map(|k| self.states.get(*k).map_or(0, |v| state_bytes(k, v))).sum();
        let total = self.states_bytes - before + after.values().sum::<usize>();
        if total > STATES_BYTES_MAX {
            return Err(FnError::StatesTooLarge { bytes: total, max: STATES_BYTES_MAX });
        }
        Ok(ran)
    }

    /// Everything below `end` (of the pass under way) is done: commit and read on.
    fn commit(&mut self, end: u64) {
        match &mut self.takeover {
            Some(t) => t.from = end,
            None => self.cursor = end,
        }
        let checkpoint = Checkpoint {
            cursor: self.cursor,
            states: self.states.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            nodes: self.settings.nodes.clone(),
            takeover: self.takeover,
        };
        self.actions.push_back(Action::Commit(checkpoint));
        self.actions.push_back(Action::Read { from: self.position() });
        self.state = State::Reading;
    }

    fn run_single(&mut self, batch: Batch) {
        let i = batch.single.unwrap_or(0);
        let inputs = vec![batch.inputs[i].clone()];
        let states = batch.states_for(&self.states, &inputs);
        self.actions.push_back(Action::Run { inputs, states });
        self.state = State::Running(batch);
    }

    /// Input `i` is settled: run the next alone, or write when none is left.
    fn next_single(&mut self, mut batch: Batch, i: usize) {
        batch.attempts = 0;
        if i + 1 < batch.inputs.len() {
            batch.single = Some(i + 1);
            self.run_single(batch);
        } else {
            self.write(batch);
        }
    }

    /// Writes the batch's outputs and dead letters, and its progress record.
    /// Writes the batch's outputs and dead letters, and a progress record when one is due.
    fn write(&mut self, mut batch: Batch) {
        for m in &batch.inputs {
            self.unrecorded.insert(&m.message.id);
        }
        if self.now_ms.saturating_sub(self.recorded_ms) >= self.settings.progress_every_ms
            && let Some(record) = self.progress_record()
        {
            batch.writes.push(record);
        }
        self.actions.push_back(Action::Write { messages: batch.writes.clone() });
        self.state = State::Writing(batch);
    }

    /// Writes only a progress record (the core is caught up), then reads on.
    fn write_progress(&mut self, record: (Destination, Message)) {
        let end = self.position();
        let batch = Batch {
            inputs: Vec::new(),
            end,
            single: None,
            attempts: 0,
            writes: vec![record],
            emitted: 0,
            filtered: 0,
            changed: BTreeMap::new(),
        };
        self.actions.push_back(Action::Write { messages: batch.writes.clone() });
        self.state = State::Writing(batch);
    }

    /// A progress record of the inputs written since the last one, if any.
    fn progress_record(&mut self) -> Option<(Destination, Message)> {
        if self.unrecorded.is_empty() {
            return None;
        }
        let processed = std::mem::take(&mut self.unrecorded);
        self.recorded_ms = self.now_ms;
        let s = &self.settings;
        let record = Record { incarnation: s.incarnation, node: s.node.to_string(), input: s.input_topic, processed };
        let id = s.deriver.progress(s.node.as_str(), s.input_topic, s.progress_epoch, self.progress_seq);
        self.progress_seq += 1;
        let message = Message {
            id,
            origin: Arc::clone(&self.origin),
            publish_time_ms: self.now_ms,
            key: Some(s.node.as_str().as_bytes().to_vec()),
            headers: Vec::new(),
            payload: record.encode(),
        };
        Some((Destination::Progress, message))
    }

    /// Adds the outputs of a run over `ran` (positions in the batch) to the batch's writes,
    /// and its state changes to the batch's.
    fn settle(&mut self, batch: &mut Batch, ran: &[usize], result: Ran, now_ms: u64) {
        let Ran { outputs, states } = result;
        batch.changed.extend(states);
        let mut rank = vec![0u32; ran.len()];
        for o in &outputs {
            let slot = o.input as usize;
            let input = &batch.inputs[ran[slot]].message;
            let id = self.settings.deriver.derive(&input.id, self.settings.input_topic, rank[slot]);
            rank[slot] += 1;
            let message = Message {
                id,
                origin: Arc::clone(&self.origin),
                publish_time_ms: now_ms,
                key: o.key.clone(),
                headers: o.headers.clone(),
                payload: o.payload.clone(),
            };
            batch.writes.push((Destination::Output(o.topic), message));
        }
        batch.emitted += outputs.len() as u64;
        batch.filtered += rank.iter().filter(|r| **r == 0).count() as u64;
    }

    fn dead_letter(&self, input: &StoredMessage, e: &FnError, now_ms: u64) -> Message {
        let m = &input.message;
        let mut headers = m.headers.clone();
        headers.push((HEADER_FUNCTION.into(), self.settings.name.clone().into_bytes()));
        headers.push((HEADER_REASON.into(), format!("{e} (input offset {})", input.offset).into_bytes()));
        headers.push((HEADER_INPUT.into(), m.id.to_string().into_bytes()));
        Message {
            id: self.settings.deriver.derive(&m.id, self.settings.input_topic, DEAD_LETTER_RANK),
            origin: Arc::clone(&self.origin),
            publish_time_ms: now_ms,
            key: m.key.clone(),
            headers,
            payload: m.payload.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
