use std::collections::BTreeMap;

use rill_storage::MessageId;

use crate::functions::abi::Output;

use super::*;

fn nn(name: &str) -> NodeName {
    NodeName::parse(name).unwrap()
}

/// A core from `cursor`, told the log holds something (as the driver does at start).
fn start(settings: Settings, cursor: u64) -> Core {
    let nodes = settings.nodes.clone();
    let checkpoint = Checkpoint { cursor, nodes, ..Checkpoint::default() };
    let mut core = Core::new(settings, Some(checkpoint), 0);
    core.handle_log_grew();
    core
}

static NEXT_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn settings(node: &str, nodes: &[&str], retries_max: u32) -> Settings {
    let mut nodes: Vec<NodeName> = nodes.iter().map(|n| nn(n)).collect();
    nodes.sort();
    Settings {
        name: "double".into(),
        deriver: Deriver::new("double", 7),
        input_topic: 0,
        node: nn(node),
        nodes,
        retries_max,
        incarnation: 7,
        // Drawn at each start, as the driver does.
        progress_epoch: NEXT_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        progress_every_ms: 0,
    }
}

/// The input log: message i from `origins[i % len]`, payload "i".
fn log(n: u64, origins: &[&str]) -> Vec<StoredMessage> {
    (0..n)
        .map(|i| StoredMessage {
            offset: i,
            message: Message {
                id: MessageId::chosen("dev", i),
                origin: origins[i as usize % origins.len()].into(),
                publish_time_ms: 1,
                key: None,
                headers: Vec::new(),
                payload: i.to_string().into_bytes(),
            },
        })
        .collect()
}

/// A function that emits each input twice ("i-a", "i-b"), drops multiples of 5, and fails
/// (the whole batch) when it sees an input listed in `bad`, `fails` times per input.
struct Doubler {
    bad: BTreeMap<u64, u32>,
}

impl Doubler {
    fn run(&mut self, inputs: &[StoredMessage]) -> Result<Ran, FnError> {
        for m in inputs {
            if let Some(left) = self.bad.get_mut(&m.offset)
                && *left > 0
            {
                *left -= 1;
                return Err(FnError::Failed(format!("cannot read input {}", m.offset)));
            }
        }
        let mut outputs = Vec::new();
        for (i, m) in inputs.iter().enumerate() {
            if m.offset % 5 == 0 {
                continue;
            }
            for suffix in ["a", "b"] {
                let payload = format!("{}-{suffix}", String::from_utf8_lossy(&m.message.payload)).into_bytes();
                outputs.push(Output { input: i as u32, topic: 0, key: None, headers: Vec::new(), payload });
            }
        }
        Ok(Ran { outputs, states: Vec::new() })
    }
}

/// What a node durably holds: messages by id (a held id is skipped, as the produce path
/// does for functions), the committed cursor, and how many writes found an id held.
#[derive(Default)]
struct Durable {
    held: BTreeMap<MessageId, (Destination, Vec<u8>)>,
    cursor: u64,
    /// The whole checkpoint last committed.
    checkpoint: Option<Checkpoint>,
    skipped: u64,
}

impl Durable {
    /// An aggregate's states, committed with the cursor.
    fn states(&self) -> States {
        self.checkpoint.iter().flat_map(|c| c.states.iter().cloned()).collect()
    }

    /// What the progress records written cover: those of `node`, and the others'.
    fn covered(&self, node: &str) -> (Covered, Covered) {
        let (mut here, mut others) = (Covered::default(), Covered::default());
        for (dest, payload) in self.held.values() {
            if *dest == Destination::Progress {
                let record = Record::decode(payload).expect("a progress record");
                if record.node == node { &mut here } else { &mut others }.extend(&record.processed);
            }
        }
        (here, others)
    }

    /// How many outputs (not dead letters or progress records) are held.
    fn outputs(&self) -> usize {
        self.held.values().filter(|(d, _)| matches!(d, Destination::Output(_))).count()
    }
}

/// Runs a function: inputs and their keys' states in, outputs and changed states out.
trait Function {
    fn run(&mut self, inputs: &[StoredMessage], states: &States) -> Result<Ran, FnError>;
}

impl Function for Doubler {
    fn run(&mut self, inputs: &[StoredMessage], _: &States) -> Result<Ran, FnError> {
        Doubler::run(self, inputs)
    }
}

/// Drives `core` until it is caught up, or until it has carried out `crash_after` actions
/// (then it stops, as a crash would: nothing more happens, what was durable stays).
/// Bounded.
fn drive(
    core: &mut Core,
    input: &[StoredMessage],
    f: &mut dyn Function,
    durable: &mut Durable,
    crash_after: Option<usize>,
) {
    for done in 0..10_000 {
        if crash_after == Some(done) {
            return;
        }
        let Some(action) = core.poll_action() else { return };
        match action {
            Action::ReadProgress => {
                let (here, others) = durable.covered(core.settings.node.as_str());
                core.handle_progress(here, others);
            }
            Action::Read { from } => {
                let batch: Vec<StoredMessage> = input.iter().filter(|m| m.offset >= from).take(4).cloned().collect();
                core.handle_read(batch);
            }
            Action::Run { inputs, states } => core.handle_run(f.run(&inputs, &states), 99),
            Action::Write { messages } => {
                for (dest, m) in messages {
                    match durable.held.entry(m.id) {
                        std::collections::btree_map::Entry::Occupied(_) => durable.skipped += 1,
                        std::collections::btree_map::Entry::Vacant(v) => {
                            v.insert((dest, m.payload));
                        }
                    }
                }
                core.handle_written(Ok(()));
            }
            Action::Commit(c) => (durable.cursor, durable.checkpoint) = (c.cursor, Some(c)),
        }
    }
    panic!("the core never caught up");
}

fn payloads(durable: &Durable, dest: &Destination) -> Vec<String> {
    let mut v: Vec<String> = durable
        .held
        .values()
        .filter(|(d, _)| d == dest)
        .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
        .collect();
    v.sort();
    v
}

fn want(n: u64, skip: &[u64]) -> Vec<String> {
    let mut v: Vec<String> =
        (0..n).filter(|i| i % 5 != 0 && !skip.contains(i)).flat_map(|i| [format!("{i}-a"), format!("{i}-b")]).collect();
    v.sort();
    v
}

#[test]
fn every_input_is_processed_once_and_the_cursor_moves_only_after_the_write() {
    let input = log(10, &["a"]);
    let mut core = start(settings("a", &["a"], 2), 0);
    let (mut f, mut durable) = (Doubler { bad: BTreeMap::new() }, Durable::default());
    // Read, run, write: the cursor has not moved yet; the commit comes next.
    drive(&mut core, &input, &mut f, &mut durable, Some(3));
    assert_eq!((durable.cursor, durable.outputs()), (0, 6));
    assert!(matches!(core.poll_action(), Some(Action::Commit(c)) if c.cursor == 4 && c.states.is_empty()));
    drive(&mut core, &input, &mut f, &mut durable, None);
    assert_eq!(payloads(&durable, &Destination::Output(0)), want(10, &[]));
    assert_eq!(durable.cursor, 10);
    let c = core.counters();
    assert_eq!((c.processed, c.emitted, c.filtered, c.failed, c.dead_lettered), (10, 16, 2, 0, 0));
    // The ids are derived: output k of input (dev, 0, i) from topic 0.
    let id = MessageId {
        producer: rill_storage::ProducerId("$fn/double.0000000000000007/0.1/dev".into()),
        epoch: 0,
        seq: 3,
    };
    assert_eq!(durable.held[&id].1, b"3-b");
    // The log grows: the core reads again from its cursor.
    let more = log(12, &["a"]);
    core.handle_log_grew();
    drive(&mut core, &more, &mut f, &mut durable, None);
    assert_eq!(payloads(&durable, &Destination::Output(0)), want(12, &[]));
}

#[test]
fn a_crash_at_any_step_loses_nothing_and_stores_nothing_twice() {
    let input = log(10, &["a"]);
    let mut skipped = 0;
    for first_crash in 1..16 {
        // Crash after `first_crash` actions, then after every 1..=5 actions in turn; each
        // time a new core resumes from the committed cursor; finally run to the end.
        let mut durable = Durable::default();
        let mut f = Doubler { bad: BTreeMap::from([(7, 1)]) };
        let mut crash = first_crash;
        for _ in 0..12 {
            let mut core = start(settings("a", &["a"], 2), durable.cursor);
            drive(&mut core, &input, &mut f, &mut durable, Some(crash));
            crash = crash % 5 + 1;
        }
        let mut core = start(settings("a", &["a"], 2), durable.cursor);
        drive(&mut core, &input, &mut f, &mut durable, None);
        assert_eq!(payloads(&durable, &Destination::Output(0)), want(10, &[]), "crashes from step {first_crash}");
        assert_eq!(durable.cursor, 10);
        skipped += durable.skipped;
    }
    assert!(skipped > 0, "some re-runs found their outputs held");
}

#[test]
fn a_bad_input_is_retried_alone_then_dead_lettered_and_the_others_go_on() {
    let input = log(8, &["a"]);
    // Input 3 always fails; input 6 fails once, then works.
    let mut f = Doubler { bad: BTreeMap::from([(3, u32::MAX), (6, 1)]) };
    let mut core = start(settings("a", &["a"], 2), 0);
    let mut durable = Durable::default();
    drive(&mut core, &input, &mut f, &mut durable, None);
    assert_eq!(payloads(&durable, &Destination::Output(0)), want(8, &[3]));
    let letters: Vec<&(Destination, Vec<u8>)> =
        durable.held.values().filter(|(d, _)| *d == Destination::DeadLetter).collect();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1, b"3", "the dead letter carries the input's payload");
    let c = core.counters();
    // Input 3's batch fails, then input 3 alone three times (1 + 2 retries); input 6's
    // batch fails once, then every input of it works alone.
    assert_eq!((c.dead_lettered, c.failed), (1, 5));
    assert_eq!(durable.cursor, 8);
    // A re-run after a crash derives the dead letter's id again: still one.
    let mut again = start(settings("a", &["a"], 2), 0);
    let mut f = Doubler { bad: BTreeMap::from([(3, u32::MAX)]) };
    drive(&mut again, &input, &mut f, &mut durable, None);
    assert_eq!(durable.held.values().filter(|(d, _)| *d == Destination::DeadLetter).count(), 1);
}

#[test]
fn the_dead_letter_names_the_function_the_reason_and_the_input() {
    let input = log(1, &["a"]);
    let mut core = start(settings("a", &["a"], 0), 0);
    let mut f = Doubler { bad: BTreeMap::from([(0, u32::MAX)]) };
    let _ = core.poll_action();
    core.handle_read(input.clone());
    let _ = core.poll_action();
    core.handle_run(f.run(&input), 5);
    let Some(Action::Write { messages }) = core.poll_action() else { panic!("a write") };
    let (dest, letter) = &messages[0];
    assert_eq!(*dest, Destination::DeadLetter);
    let header = |name: &str| {
        letter.headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header(HEADER_FUNCTION).as_deref(), Some("double"));
    assert!(header(HEADER_REASON).is_some_and(|r| r.contains("cannot read input 0") && r.contains("input offset 0")));
    assert_eq!(header(HEADER_INPUT).as_deref(), Some("dev:0"));
}

#[test]
fn each_input_has_one_owner_among_the_function_nodes() {
    let nodes = [nn("edge"), nn("eu"), nn("us")];
    assert_eq!(owner("eu", &nodes), Some(&nn("eu")), "its origin, where the function runs");
    assert_eq!(owner("gw-9", &nodes), Some(&nn("edge")), "else the first node by name");
    assert_eq!(owner("x", &[]), None);
    // Two nodes over one replicated log: each processes what it owns, together all once.
    let input = log(9, &["eu", "us", "gw-9"]);
    let mut durable = Durable::default();
    for node in ["edge", "eu", "us"] {
        let mut core = start(settings(node, &["edge", "eu", "us"], 1), 0);
        let mut f = Doubler { bad: BTreeMap::new() };
        drive(&mut core, &input, &mut f, &mut durable, None);
        assert_eq!(core.counters().processed + core.counters().not_owned, 9);
    }
    assert_eq!(payloads(&durable, &Destination::Output(0)), want(9, &[]));
    assert_eq!(durable.skipped, 0, "no input was processed twice");
}

#[test]
fn a_failed_write_is_asked_for_again_and_nothing_moves_meanwhile() {
    let input = log(2, &["a"]);
    let mut core = start(settings("a", &["a"], 0), 0);
    let mut f = Doubler { bad: BTreeMap::new() };
    let _ = core.poll_action();
    core.handle_read(input.clone());
    let _ = core.poll_action();
    core.handle_run(f.run(&input), 1);
    let first = core.poll_action();
    assert!(matches!(first, Some(Action::Write { .. })));
    core.handle_written(Err("disk full".into()));
    assert_eq!(core.poll_action(), first, "the same write again");
    core.handle_written(Ok(()));
    assert!(matches!(core.poll_action(), Some(Action::Commit(c)) if c.cursor == 2));
}

/// An aggregate: per key, the sum of the inputs so far (payloads are numbers); each input
/// emits "key=sum". Fails (the whole batch) on an input listed in `bad`, every time.
struct Summer {
    bad: Vec<u64>,
}

impl Function for Summer {
    fn run(&mut self, inputs: &[StoredMessage], states: &States) -> Result<Ran, FnError> {
        if let Some(m) = inputs.iter().find(|m| self.bad.contains(&m.offset)) {
            return Err(FnError::Failed(format!("bad input {}", m.offset)));
        }
        let mut sums: BTreeMap<StateKey, u64> = BTreeMap::new();
        let mut outputs = Vec::new();
        for (i, m) in inputs.iter().enumerate() {
            let key = m.message.key.clone();
            let before = sums
                .get(&key)
                .copied()
                .or_else(|| states.get(&key).map(|s| u64::from_le_bytes(s.as_slice().try_into().expect("8 bytes"))));
            let sum =
                before.unwrap_or(0) + String::from_utf8_lossy(&m.message.payload).parse::<u64>().expect("a number");
            sums.insert(key.clone(), sum);
            let name = String::from_utf8_lossy(key.as_deref().unwrap_or(b"-")).into_owned();
            let payload = format!("{name}={sum}").into_bytes();
            outputs.push(Output { input: i as u32, topic: 0, key, headers: Vec::new(), payload });
        }
        let states = sums.into_iter().map(|(k, s)| (k, Some(s.to_le_bytes().to_vec()))).collect();
        Ok(Ran { outputs, states })
    }
}

/// Inputs keyed "k0", "k1", "k2" in turn, payload the offset.
fn keyed_log(n: u64) -> Vec<StoredMessage> {
    let mut input = log(n, &["a"]);
    for m in &mut input {
        m.message.key = Some(format!("k{}", m.offset % 3).into_bytes());
    }
    input
}

/// The sums an aggregate must emit over `keyed_log(n)`, leaving out `skip`.
fn sums(n: u64, skip: &[u64]) -> Vec<String> {
    let mut total = [0u64; 3];
    let mut out = Vec::new();
    for i in (0..n).filter(|i| !skip.contains(i)) {
        total[(i % 3) as usize] += i;
        out.push(format!("k{}={}", i % 3, total[(i % 3) as usize]));
    }
    out.sort();
    out
}

#[test]
fn an_aggregate_keeps_state_per_key_committed_with_the_cursor_through_crashes() {
    let input = keyed_log(20);
    for first_crash in 1..16 {
        let mut durable = Durable::default();
        let mut crash = first_crash;
        for _ in 0..12 {
            let mut core = Core::new(settings("a", &["a"], 1), durable.checkpoint.clone(), 0);
            core.handle_log_grew();
            drive(&mut core, &input, &mut Summer { bad: vec![] }, &mut durable, Some(crash));
            crash = crash % 5 + 1;
        }
        let mut core = Core::new(settings("a", &["a"], 1), durable.checkpoint.clone(), 0);
        core.handle_log_grew();
        drive(&mut core, &input, &mut Summer { bad: vec![] }, &mut durable, None);
        assert_eq!(payloads(&durable, &Destination::Output(0)), sums(20, &[]), "crashes from step {first_crash}");
        let state = |k: &str| durable.states().get(&Some(k.as_bytes().to_vec())).cloned();
        assert_eq!(state("k1"), Some((1 + 4 + 7 + 10 + 13 + 16 + 19u64).to_le_bytes().to_vec()));
    }
}

#[test]
fn an_aggregate_input_dead_lettered_leaves_its_keys_state_alone() {
    let input = keyed_log(9);
    let mut durable = Durable::default();
    let mut core = start(settings("a", &["a"], 1), 0);
    // Input 4 (key k1) always fails: its batch is run input by input, each from the state
    // the inputs before it left.
    drive(&mut core, &input, &mut Summer { bad: vec![4] }, &mut durable, None);
    assert_eq!(payloads(&durable, &Destination::Output(0)), sums(9, &[4]));
    assert_eq!(core.counters().dead_lettered, 1);
}

#[test]
fn an_aggregate_whose_states_outgrow_the_limit_fails_that_run() {
    struct Hoarder;
    impl Function for Hoarder {
        fn run(&mut self, inputs: &[StoredMessage], _: &States) -> Result<Ran, FnError> {
            let states =
                inputs.iter().map(|m| (m.message.key.clone(), Some(vec![0; STATES_BYTES_MAX / 2 - 8]))).collect();
            Ok(Ran { outputs: Vec::new(), states })
        }
    }
    let input = keyed_log(3);
    let mut durable = Durable::default();
    let mut core = start(settings("a", &["a"], 0), 0);
    drive(&mut core, &input, &mut Hoarder, &mut durable, None);
    // Two keys' states fit; the third input's would pass the limit: dead-lettered.
    assert_eq!((core.counters().dead_lettered, durable.states().len()), (1, 2));
    let letter = durable.held.values().find(|(d, _)| *d == Destination::DeadLetter).expect("a dead letter");
    assert_eq!(letter.1, b"2");
}

/// Runs `node` of a function on `nodes` over `input` from its own checkpoint in `saved`
/// (none: a first start), crashing after `crash_after` actions if given. `durable` is
/// what every node holds (outputs and progress records replicate).
fn run_node(
    node: &str,
    nodes: &[&str],
    input: &[StoredMessage],
    durable: &mut Durable,
    saved: &mut BTreeMap<String, Checkpoint>,
    crash_after: Option<usize>,
) -> Counters {
    let mut core = Core::new(settings(node, nodes, 1), saved.get(node).cloned(), 0);
    core.handle_log_grew();
    durable.checkpoint = None;
    drive(&mut core, input, &mut Doubler { bad: BTreeMap::new() }, durable, crash_after);
    if let Some(c) = durable.checkpoint.take() {
        saved.insert(node.to_string(), c);
    }
    core.counters()
}

#[test]
fn when_a_node_leaves_the_first_node_takes_over_what_it_left_undone_and_nothing_twice() {
    // Inputs from a, b, c and a gateway x that runs no function (the first node, a, owns
    // x's). b processes part of its inputs, then leaves the function.
    let input = log(60, &["a", "b", "c", "x"]);
    for b_crash in [1, 4, 9, 13, 1000] {
        let mut durable = Durable::default();
        let mut saved = BTreeMap::new();
        for node in ["a", "c"] {
            run_node(node, &["a", "b", "c"], &input, &mut durable, &mut saved, None);
        }
        run_node("b", &["a", "b", "c"], &input, &mut durable, &mut saved, Some(b_crash));
        // Now a and c run it; a owns b's inputs (the first node), and crashes once mid-pass.
        run_node("a", &["a", "c"], &input, &mut durable, &mut saved, Some(5));
        let a = run_node("a", &["a", "c"], &input, &mut durable, &mut saved, None);
        let c = run_node("c", &["a", "c"], &input, &mut durable, &mut saved, None);
        assert_eq!(payloads(&durable, &Destination::Output(0)), want(60, &[]), "b stopped after {b_crash} actions");
        assert_eq!(durable.skipped, 0, "no input ran twice (b stopped after {b_crash} actions)");
        assert_eq!(c.processed, 0, "c's inputs were all done");
        assert!(a.covered > 0, "a skipped what the records cover");
        assert_eq!(saved["a"].takeover, None, "the pass is over");
    }
}

#[test]
fn a_node_that_joins_takes_its_own_inputs_over_where_the_first_node_left_them() {
    let mut durable = Durable::default();
    let mut saved = BTreeMap::new();
    // a runs it alone and processes everything, b's inputs too.
    let first = log(20, &["a", "b"]);
    run_node("a", &["a"], &first, &mut durable, &mut saved, None);
    // b joins: a first start there; the records say a did b's inputs so far.
    let more = log(40, &["a", "b"]);
    let b = run_node("b", &["a", "b"], &more, &mut durable, &mut saved, None);
    let a = run_node("a", &["a", "b"], &more, &mut durable, &mut saved, None);
    assert_eq!(payloads(&durable, &Destination::Output(0)), want(40, &[]));
    assert_eq!(durable.skipped, 0, "no input ran twice");
    assert_eq!((b.covered, b.processed), (10, 10), "b skips the 10 a did and does the 10 new ones");
    assert_eq!(a.processed, 10, "a does its own 10 new ones and no takeover work");
}

#[test]
fn the_takeover_can_fail_its_test_without_the_progress_records() {
    // Guard: with the records ignored, a takes b's inputs over from scratch and runs
    // some a second time, which the same scenario above rules out.
    let input = log(60, &["a", "b", "c", "x"]);
    let mut durable = Durable::default();
    let mut saved = BTreeMap::new();
    for node in ["a", "b", "c"] {
        run_node(node, &["a", "b", "c"], &input, &mut durable, &mut saved, None);
    }
    let mut core = Core::new(settings("a", &["a", "c"], 1), saved.get("a").cloned(), 0);
    core.handle_log_grew();
    assert_eq!(core.poll_action(), Some(Action::ReadProgress));
    core.handle_progress(Covered::default(), Covered::default());
    durable.checkpoint = None;
    drive(&mut core, &input, &mut Doubler { bad: BTreeMap::new() }, &mut durable, None);
    assert!(durable.skipped > 0, "b's outputs ran twice");
}

#[test]
fn progress_is_recorded_at_most_once_a_period_and_when_caught_up() {
    let input = log(10, &["a"]);
    let mut s = settings("a", &["a"], 1);
    s.progress_every_ms = 1_000;
    let mut core = Core::new(s, None, 0);
    core.handle_log_grew();
    let mut durable = Durable::default();
    // `drive` runs at time 99 and reads 4 inputs a batch: three batches, no period over.
    drive(&mut core, &input, &mut Doubler { bad: BTreeMap::new() }, &mut durable, None);
    let records: Vec<&(Destination, Vec<u8>)> =
        durable.held.values().filter(|(d, _)| *d == Destination::Progress).collect();
    assert_eq!(records.len(), 1, "one record, when caught up");
    let (here, _) = durable.covered("a");
    assert!(input.iter().all(|m| here.contains(&m.message.id)), "it covers every input");
    assert_eq!(durable.cursor, 10);
}
