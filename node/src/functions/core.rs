//! The operator core: one function on one node over one of its input topics, without I/O
//! (DESIGN section 8: input batch in, outputs and cursor commits out). The driver reads
//! the log, runs the module, writes through the produce path and stores the cursor; this
//! decides what happens, in this order, so that every owned input's outputs are stored
//! exactly once whatever crashes:
//!
//! 1. `Read` from the committed cursor; the batch that comes back keeps only the inputs
//!    this node owns ([`owner`]).
//! 2. `Run` the function over them. If the batch fails, each input runs alone, so one bad
//!    input cannot hold the others back; an input that fails alone is run again up to
//!    `retries_max` times, then dead-lettered.
//! 3. `Write` the outputs under ids derived from their inputs ([`super::ids`]), and the
//!    dead letters (under derived ids too), durably.
//! 4. Only then `Commit` the cursor past the batch, with an aggregate's states as they
//!    stand after it (one record, so the two never disagree).
//!
//! A crash anywhere before 4 runs the batch again after the restart; its outputs carry
//! the same ids, so the log stores them once (the driver writes with "skip held ids"). An
//! aggregate runs it again from the states committed with the cursor, so a deterministic
//! guest gives the same outputs.
//! Call contract: after each `handle_*`, take every action with [`Core::poll_action`] and
//! answer `Read`, `Run` and `Write` with the matching `handle_*` call; `Commit` needs no
//! answer (a lost commit only repeats work).
use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use rill_storage::{Message, NodeName, StoredMessage};

use super::{
    abi::StateKey,
    ids::Deriver,
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
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
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
    /// Persist the cursor and the states in one record: every input below `offset` is
    /// done, and an aggregate's states are those after it.
    Commit {
        /// The new cursor.
        offset: u64,
        /// Every key's state (empty unless the function is an aggregate).
        states: States,
    },
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
    state: State,
    actions: VecDeque<Action>,
    counters: Counters,
    /// This node's name as stamped on outputs.
    origin: Arc<str>,
}

impl Core {
    /// A core resuming from the committed `cursor`. It reads once told the log may hold
    /// something ([`Core::handle_log_grew`]; the driver says so at start).
    pub(crate) fn new(settings: Settings, cursor: u64, states: States) -> Core {
        let origin = settings.node.as_str().into();
        let states_bytes = states.iter().map(|(k, v)| state_bytes(k, v)).sum();
        Core {
            settings,
            cursor,
            states,
            states_bytes,
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
        if matches!(self.state, State::CaughtUp) {
            self.state = State::Reading;
            self.actions.push_back(Action::Read { from: self.cursor });
        }
    }

    /// The answer to `Read`: the messages from the cursor on (empty: nothing new).
    pub(crate) fn handle_read(&mut self, read: Vec<StoredMessage>) {
        let Some(last) = read.last() else {
            self.state = State::CaughtUp;
            return;
        };
        let end = last.offset + 1;
        let node = &self.settings.node;
        let (inputs, others): (Vec<_>, Vec<_>) =
            read.into_iter().partition(|m| owner(&m.message.origin, &self.settings.nodes) == Some(node));
        self.counters.not_owned += others.len() as u64;
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

    fn commit(&mut self, end: u64) {
        self.cursor = end;
        self.actions.push_back(Action::Commit { offset: end, states: self.states.clone() });
        self.actions.push_back(Action::Read { from: end });
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

    fn write(&mut self, batch: Batch) {
        self.actions.push_back(Action::Write { messages: batch.writes.clone() });
        self.state = State::Writing(batch);
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
