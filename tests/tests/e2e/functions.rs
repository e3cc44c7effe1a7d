//! `rill fn test` (issue 17): a module run over sample input with no node, as a node
//! would run it; a module that loops is stopped and its inputs dead-lettered.
use crate::support::{run, text};

fn fn_test(dir: &std::path::Path, wasm: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<String> = ["fn", "test", "--wasm"].map(String::from).to_vec();
    args.push(wasm.display().to_string());
    args.extend(["--input".to_string(), dir.join("in.jsonl").display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    run(dir, &args, "")
}

#[test]
fn fn_test_runs_the_example_filter_and_stops_a_looping_module() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lines = "{\"t\":21.5}\n# calibrating\n\n{\"t\":22.0}\n";
    std::fs::write(dir.path().join("in.jsonl"), lines).expect("input");
    let filter = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions/examples/filter.wasm");
    let out = fn_test(dir.path(), &filter, &["--batch", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let kept: Vec<(&str, &str)> =
        printed.iter().map(|v| (v["id"].as_str().expect("id"), v["payload"].as_str().expect("payload"))).collect();
    let want = [
        ("$fn/test.0000000000000000/0.0/in.jsonl:1", "{\"t\":21.5}"),
        ("$fn/test.0000000000000000/0.0/in.jsonl:4", "{\"t\":22.0}"),
    ];
    assert_eq!(kept, want);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("run 1: lines 1..=3, 1 out") && stderr.contains("run 2: lines 4..=4, 1 out"), "{stderr}");
    assert!(stderr.contains("4 in: 4 processed, 2 out, 2 filtered, 0 failed runs, 0 dead-lettered"), "{stderr}");

    let looping = dir.path().join("loop.wasm");
    let wat = r#"(module (memory (export "memory") 1)
                   (func (export "rill_alloc") (param i32) (result i32) (i32.const 1024))
                   (func (export "rill_process") (param i32 i32) (result i64) (loop $l (br $l)) (i64.const 0)))"#;
    std::fs::write(&looping, wat::parse_str(wat).expect("wat")).expect("module");
    let out = fn_test(dir.path(), &looping, &["--fuel", "1000000", "--retries", "1"]);
    assert!(!out.status.success(), "dead letters fail the test run");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("run 1: lines 1..=4 failed") && stderr.contains("ran out of fuel"), "{stderr}");
    // The batch, then each of the 4 inputs alone twice (one retry).
    assert!(stderr.contains("9 failed runs, 4 dead-lettered"), "{stderr}");
    let letters: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(letters.len(), 4);
    assert!(letters.iter().all(|l| l["topic"] == "fn.test.dlq"));
    let reason =
        letters[0]["headers"].as_array().expect("headers").iter().find(|h| h[0] == "rill-fn-reason").expect("a reason");
    assert!(
        reason[1].as_str().is_some_and(|r| r.contains("ran out of fuel") && r.contains("input offset 0")),
        "{reason}"
    );
}
