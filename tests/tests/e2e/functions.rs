//! `rill fn test` (issue 17): a module run over sample input with no node, and a module
//! that loops stopped with an error naming the batch.
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
    let kept: Vec<(u64, &str)> = printed
        .iter()
        .map(|v| (v["input_line"].as_u64().expect("line"), v["payload"].as_str().expect("payload")))
        .collect();
    assert_eq!(kept, vec![(1, "{\"t\":21.5}"), (4, "{\"t\":22.0}")]);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("batch 1: 3 in, 1 out") && stderr.contains("batch 2: 1 in, 1 out"), "{stderr}");

    let looping = dir.path().join("loop.wasm");
    let wat = r#"(module (memory (export "memory") 1)
                   (func (export "rill_alloc") (param i32) (result i32) (i32.const 1024))
                   (func (export "rill_process") (param i32 i32) (result i64) (loop $l (br $l)) (i64.const 0)))"#;
    std::fs::write(&looping, wat::parse_str(wat).expect("wat")).expect("module");
    let out = fn_test(dir.path(), &looping, &["--fuel", "1000000"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("batch 1 (input lines 1..=4)") && stderr.contains("ran out of fuel"), "{stderr}");
}
