use super::*;

const FILTER: &str = include_str!("../../../../functions/examples/filter.wat");

fn module(wat: &str) -> Module {
    Module::new(&wat::parse_str(wat).unwrap()).unwrap()
}

/// A guest with a fixed-address allocator and the given extra functions.
fn guest(body: &str) -> Module {
    module(&format!(
        r#"(module
             (import "rill" "log" (func $log (param i32 i32)))
             (memory (export "memory") 1)
             (data (i32.const 100) "hello from the guest")
             (func (export "rill_alloc") (param i32) (result i32) (i32.const 1024))
             {body})"#
    ))
}

impl Running {
    /// Runs a batch of a function that is not an aggregate: its outputs.
    fn run(&mut self, inputs: &[Input<'_>], topics: usize) -> Result<Vec<Output>, FnError> {
        self.process(inputs, &BTreeMap::new(), topics).map(|ran| ran.outputs)
    }
}

fn input<'a>(offset: u64, payload: &'a [u8], headers: &'a [(String, Vec<u8>)]) -> Input<'a> {
    Input { offset, publish_time_ms: 1, key: Some(b"dev-1"), headers, payload }
}

#[test]
fn the_committed_example_modules_are_built_from_their_sources() {
    let built = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../functions/examples/filter.wasm")).unwrap();
    assert!(built == wat::parse_str(FILTER).unwrap(), "filter.wasm is stale: run functions/build-examples");
}

#[test]
fn the_example_filter_keeps_readings_and_drops_comments_and_empty_lines() {
    let headers = vec![("unit".to_string(), b"C".to_vec())];
    let payloads: [&[u8]; 4] = [b"21.5", b"# calibrating", b"", b"22.0"];
    let inputs: Vec<Input<'_>> = payloads.iter().enumerate().map(|(i, p)| input(i as u64, p, &headers)).collect();
    let mut f = Running::start(&module(FILTER), &[], Limits::default()).unwrap();
    for _ in 0..3 {
        let outputs = f.run(&inputs, 1).unwrap();
        let kept: Vec<(u32, &[u8])> = outputs.iter().map(|o| (o.input, &o.payload[..])).collect();
        assert_eq!(kept, vec![(0, &b"21.5"[..]), (3, &b"22.0"[..])]);
        assert!(outputs.iter().all(|o| o.key.as_deref() == Some(&b"dev-1"[..]) && o.headers == headers));
    }
    // A batch far larger than the initial memory: the guest grows it.
    let big = vec![b'7'; 300_000];
    let outputs = f.run(&[input(0, &big, &[])], 1).unwrap();
    assert_eq!(outputs[0].payload.len(), 300_000);
}

#[test]
fn a_guest_that_loops_traps_or_grows_too_much_is_stopped_with_a_clear_error() {
    let limits = Limits { fuel_per_call: 10_000_000, memory_bytes: 4 << 20, ..Limits::default() };
    let looping =
        guest(r#"(func (export "rill_process") (param i32 i32) (result i64) (loop $l (br $l)) (i64.const 0))"#);
    let err = Running::start(&looping, &[], limits).unwrap().run(&[], 1).unwrap_err();
    assert_eq!(err, FnError::OutOfFuel(10_000_000));
    let trapping = guest(r#"(func (export "rill_process") (param i32 i32) (result i64) unreachable)"#);
    let err = Running::start(&trapping, &[], limits).unwrap().run(&[], 1).unwrap_err();
    assert!(matches!(&err, FnError::Trap(t) if t.contains("unreachable")), "{err}");
    let growing = guest(
        r#"(func (export "rill_process") (param i32 i32) (result i64)
             (drop (memory.grow (i32.const 1000))) (i64.const 0))"#,
    );
    let err = Running::start(&growing, &[], limits).unwrap().run(&[], 1).unwrap_err();
    assert_eq!(err, FnError::Memory(4 << 20));
    // A module that asks for more memory than allowed up front does not start.
    let greedy = module(
        r#"(module (memory (export "memory") 100)
             (func (export "rill_alloc") (param i32) (result i32) (i32.const 0))
             (func (export "rill_process") (param i32 i32) (result i64) (i64.const 0)))"#,
    );
    let started = Running::start(&greedy, &[], limits).map(|_| ());
    assert!(matches!(started, Err(FnError::Memory(_))), "{started:?}");
    // An instance that was stopped still serves the next call.
    let mut f = Running::start(&looping, &[], limits).unwrap();
    assert!(f.run(&[], 1).is_err());
    assert!(f.run(&[], 1).is_err(), "fuel is refilled per call, the loop stops again");
}

#[test]
fn bad_answers_and_modules_are_refused_by_name() {
    // An answer pointing outside memory, a too-large one, a malformed one, a failed batch.
    let outside =
        guest(r#"(func (export "rill_process") (param i32 i32) (result i64) (i64.const 0x0000fff000000100))"#);
    let err = Running::start(&outside, &[], Limits::default()).unwrap().run(&[], 1).unwrap_err();
    assert!(matches!(&err, FnError::Malformed(m) if m.contains("outside its memory")), "{err}");
    let huge = guest(r#"(func (export "rill_process") (param i32 i32) (result i64) (i64.const 0x7fffffff))"#);
    let limits = Limits { answer_bytes_max: 1000, ..Limits::default() };
    let err = Running::start(&huge, &[], limits).unwrap().run(&[], 1).unwrap_err();
    assert_eq!(err, FnError::AnswerTooLarge { len: 0x7fff_ffff, max: 1000 });
    let garbage = guest(r#"(func (export "rill_process") (param i32 i32) (result i64) (i64.const 100))"#);
    let err = Running::start(&garbage, &[], Limits::default()).unwrap().run(&[], 1).unwrap_err();
    assert!(matches!(err, FnError::Malformed(_)), "{err}");
    let failing = guest(
        r#"(data (i32.const 200) "\01\00\00\00bad reading")
           (func (export "rill_process") (param i32 i32) (result i64) (i64.const 0x000000c80000000f))"#,
    );
    let err = Running::start(&failing, &[], Limits::default()).unwrap().run(&[], 1).unwrap_err();
    assert_eq!(err, FnError::Failed("bad reading".into()));
    // Not WebAssembly, no process export, a process of the wrong type.
    assert!(matches!(Module::new(b"not wasm"), Err(FnError::Invalid(_))));
    let missing = guest("");
    assert!(
        matches!(Running::start(&missing, &[], Limits::default()), Err(FnError::Abi(m)) if m.contains("rill_process"))
    );
    let mistyped = guest(r#"(func (export "rill_process") (param i32) (result i64) (i64.const 0))"#);
    assert!(matches!(Running::start(&mistyped, &[], Limits::default()), Err(FnError::Abi(_))));
    let foreign_import = module(r#"(module (import "env" "open" (func)) (memory (export "memory") 1))"#);
    assert!(matches!(Running::start(&foreign_import, &[], Limits::default()), Err(FnError::Abi(_))));
}

#[test]
fn init_gets_the_parameters_and_logs_are_bounded() {
    // rill_init logs its parameter bytes' count and refuses when there is no parameter.
    let with_init = guest(
        r#"(func (export "rill_init") (param $p i32) (param $l i32) (result i32)
             (call $log (i32.const 100) (i32.const 20))
             (if (result i32) (i32.eqz (i32.load (local.get $p))) (then (i32.const 3)) (else (i32.const 0))))
           (func (export "rill_process") (param i32 i32) (result i64)
             (local $i i32)
             (loop $l
               (call $log (i32.const 100) (i32.const 20))
               (local.set $i (i32.add (local.get $i) (i32.const 1)))
               (br_if $l (i32.lt_u (local.get $i) (i32.const 100))))
             (i32.store (i32.const 300) (i32.const 0))
             (i32.store (i32.const 304) (i32.const 0))
             (i64.const 0x0000012c00000008))"#,
    );
    let refused = Running::start(&with_init, &[], Limits::default()).unwrap_err();
    assert_eq!(refused, FnError::Init { code: 3, log: "hello from the guest".into() });
    let params = [("scale".to_string(), "2".to_string())];
    let mut f = Running::start(&with_init, &params, Limits::default()).unwrap();
    assert_eq!(f.take_logs(), (vec!["hello from the guest".to_string()], 0));
    assert_eq!(f.run(&[], 1).unwrap(), vec![]);
    let (lines, dropped) = f.take_logs();
    assert_eq!((lines.len(), dropped), (16, 84), "16 lines a call are kept, the rest counted");
}

#[test]
fn the_example_normaliser_scales_one_field_exactly_and_refuses_bad_parameters() {
    let wasm = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../functions/examples/scale.wasm")).unwrap();
    let module = Module::new(&wasm).unwrap();
    let params =
        |scale: &str| vec![("field".to_string(), "temp".to_string()), ("scale".to_string(), scale.to_string())];
    let mut f = Running::start(&module, &params("0.1"), Limits::default()).unwrap();
    let cases: [(&str, &str); 7] = [
        (r#"{"dev":"gw-1","temp":21.5}"#, r#"{"dev":"gw-1","temp":2.15}"#),
        (r#"{"temp": -3, "x":1}"#, r#"{"temp": -0.3, "x":1}"#),
        (r#"{"temp":0.125}"#, r#"{"temp":0.0125}"#),
        (r#"{"temp":0}"#, r#"{"temp":0}"#),
        (r#"{"temp":100}"#, r#"{"temp":10}"#),
        (r#"{"t":21.5}"#, r#"{"t":21.5}"#),
        ("not json at all", "not json at all"),
    ];
    let headers = vec![("unit".to_string(), b"C".to_vec())];
    let inputs: Vec<Input<'_>> =
        cases.iter().enumerate().map(|(i, (inp, _))| input(i as u64, inp.as_bytes(), &headers)).collect();
    let outputs = f.run(&inputs, 1).unwrap();
    let got: Vec<String> = outputs.iter().map(|o| String::from_utf8(o.payload.clone()).unwrap()).collect();
    assert_eq!(got, cases.iter().map(|(_, want)| want.to_string()).collect::<Vec<_>>());
    assert!(outputs.iter().all(|o| o.key.as_deref() == Some(&b"dev-1"[..]) && o.headers == headers));
    // A number too long for exact arithmetic fails the batch, naming why.
    let err = f.run(&[input(0, br#"{"temp":12345678901}"#, &[])], 1).unwrap_err();
    assert!(matches!(&err, FnError::Failed(why) if why.contains("9 significant digits")), "{err}");
    // Bad parameters stop the start, with the guest's reason.
    let err = Running::start(&module, &params("x"), Limits::default()).unwrap_err();
    assert!(err.to_string().contains("scale is not a decimal"), "{err}");
    let unknown = vec![("bogus".to_string(), "1".to_string())];
    let err = Running::start(&module, &unknown, Limits::default()).unwrap_err();
    assert!(err.to_string().contains("unknown parameter"), "{err}");
}

#[test]
fn the_example_rolling_mean_keeps_a_window_per_key_across_batches_through_its_states() {
    let wasm = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../functions/examples/rolling_mean.wasm")).unwrap();
    let module = Module::new(&wasm).unwrap();
    let params = vec![("window".to_string(), "3".to_string())];
    let mut f = Running::start(&module, &params, Limits::default()).unwrap();
    let keyed = |key: &'static [u8], payload: &'static [u8]| Input {
        offset: 0,
        publish_time_ms: 1,
        key: Some(key),
        headers: &[],
        payload,
    };
    let mut states: BTreeMap<StateKey, Vec<u8>> = BTreeMap::new();
    let mut means = Vec::new();
    let batches: [&[Input<'_>]; 2] = [
        &[keyed(b"a", br#"{"t":1}"#), keyed(b"b", br#"{"t":10}"#), keyed(b"a", br#"{"t":2}"#)],
        &[keyed(b"a", br#"{"t":4.5}"#), keyed(b"b", br#"{"x":0}"#), keyed(b"a", br#"{"t":-1}"#)],
    ];
    for batch in batches {
        let ran = f.process(batch, &states, 1).unwrap();
        for o in &ran.outputs {
            means.push(format!(
                "{}:{}",
                String::from_utf8_lossy(o.key.as_deref().unwrap()),
                String::from_utf8_lossy(&o.payload)
            ));
        }
        for (key, state) in ran.states {
            match state {
                Some(s) => states.insert(key, s),
                None => states.remove(&key),
            };
        }
    }
    let want = [
        r#"a:{"mean":1,"n":1}"#,
        r#"b:{"mean":10,"n":1}"#,
        r#"a:{"mean":1.5,"n":2}"#,
        // The second batch starts from the states the first left: 1, 2, then 4.5 and -1.
        r#"a:{"mean":2.5,"n":3}"#,
        r#"a:{"mean":1.833333,"n":3}"#,
    ];
    assert_eq!(means, want);
    // A fresh instance given the states carries on where this one is.
    let mut g = Running::start(&module, &params, Limits::default()).unwrap();
    let ran = g.process(&[keyed(b"b", br#"{"t":20}"#)], &states, 1).unwrap();
    assert_eq!(String::from_utf8_lossy(&ran.outputs[0].payload), r#"{"mean":15,"n":2}"#);
    let err = Running::start(&module, &[("window".into(), "65".into())], Limits::default()).unwrap_err();
    assert!(err.to_string().contains("window is not a whole number from 1 to 64"), "{err}");
}
