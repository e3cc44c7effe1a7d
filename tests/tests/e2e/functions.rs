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

/// Waits until `topic` on `node` ends at `count` messages (bounded).
async fn wait_for_end(node: &crate::support::TestNode, topic: &str, count: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let topics = node.client().await.list_topics().await.expect("topics");
        let end = topics.iter().find(|t| t.topic == topic).map_or(0, |t| t.end_offset);
        assert!(end <= count, "{topic} holds {end} messages, more than the {count} inputs");
        if end == count {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{topic} reached only {end} of {count}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Kills the node (kill -9) twice while the function has written some but not all of its
/// `count` outputs to `output`, then waits for all of them.
async fn kill_twice_partway(node: &mut crate::support::TestNode, output: &str, count: u64) {
    for _ in 0..2 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let topics = node.client().await.list_topics().await.expect("topics");
            let end = topics.iter().find(|t| t.topic == output).map_or(0, |t| t.end_offset);
            if end > 0 && end < count {
                break;
            }
            assert!(end < count, "the function finished before the kill; make the input larger");
            assert!(std::time::Instant::now() < deadline, "the function made no progress");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        node.restart();
    }
    wait_for_end(node, output, count).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_killed_mid_batch_stores_each_output_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = crate::support::TestNode::start(dir.path(), "fx");
    let scale = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions/examples/scale.wasm");
    let scale = scale.display().to_string();
    let args = [
        "fn",
        "create",
        "acme/fx/norm",
        "--wasm",
        &scale,
        "--input",
        "acme/raw/t",
        "--output",
        "acme/clean/t",
        "--param",
        "scale=0.5",
    ];
    let out = node.cli(&args, "");
    assert!(out.status.success(), "fn create: {}", text(&out.stderr));
    const N: u64 = 30_000;
    produce_readings(&node, "acme/raw/t", "sensor", 0..N).await;
    kill_twice_partway(&mut node, "acme/clean/t", N).await;
    let mut seen = std::collections::BTreeMap::new();
    crate::support::read_seqs(&node, "acme/clean/t", N, |m| {
        let payload = text(&m.message.payload);
        let prefix = "{\"seq\":";
        let seq: u64 = payload[prefix.len()..payload.find(',').expect("a comma")].parse().expect("seq");
        let half = if seq.is_multiple_of(2) { format!("{}", seq / 2) } else { format!("{}.5", seq / 2) };
        assert_eq!(payload, format!("{{\"seq\":{seq},\"t\":{half}}}"), "scaled");
        *seen.entry(seq).or_insert(0) += 1;
    })
    .await;
    assert_eq!(seen.len() as u64, N, "every input's output");
    assert!(seen.values().all(|n| *n == 1), "each once");
    // Statistics since the last start: caught up, nothing failed.
    let stats = node.client().await.stats().await.expect("stats");
    let f = stats.functions.iter().find(|f| f.name == "acme/fx/norm").expect("the function's statistics");
    assert_eq!((f.input.as_str(), f.lag_messages, f.failed, f.dead_lettered), ("acme/raw/t", 0, 0, 0), "{f:?}");
    assert!(f.processed > 0 && f.emitted == f.processed && f.run_p99_us >= f.run_p50_us, "{f:?}");
    let printed = node.cli(&["stats"], "");
    assert!(
        text(&printed.stdout).contains("function acme/fx/norm on acme/raw/t: processed"),
        "{}",
        text(&printed.stdout)
    );
}

/// Waits until the output topic holds `want` messages on every node (bounded).
async fn wait_for_outputs(nodes: &[&crate::support::TestNode], topic: &str, want: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let mut ends = Vec::new();
        for n in nodes {
            let topics = n.client().await.list_topics().await.expect("topics");
            ends.push(topics.iter().find(|t| t.topic == topic).map_or(0, |t| t.end_offset));
        }
        assert!(ends.iter().all(|&e| e <= want), "more outputs than inputs: {ends:?} > {want}");
        if ends.iter().all(|&e| e == want) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "outputs reached only {ends:?} of {want}\n{}", nodes[1].log());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_on_two_nodes_gets_its_module_by_replication_and_each_output_is_stored_once_on_both() {
    let mesh = crate::mesh::MeshDir::on(&[("a", "127.0.0.1"), ("b", "127.0.0.1")]);
    mesh.configure("a", &["b"], &[]);
    mesh.configure("b", &[], &["a"]);
    let a = mesh.start("a");
    let mut b = mesh.start("b");
    crate::mesh::create_namespace(&a, &["a", "b"]).await;
    let scale = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions/examples/scale.wasm");
    let scale = scale.display().to_string();
    // The module goes to a alone; b must fetch it. Default nodes: a and b.
    let args = ["fn", "create", "acme/sensors/norm", "--wasm", &scale, "--input", "acme/sensors/temp"];
    let out = a.cli(&[&args[..], &["--output", "acme/sensors/clean", "--param", "scale=0.5"]].concat(), "");
    assert!(out.status.success(), "fn create: {}", text(&out.stderr));
    const N: u64 = 5_000;
    for (node, producer) in [(&a, "pa"), (&b, "pb")] {
        produce_readings(node, crate::mesh::TOPIC, producer, 0..N).await;
    }
    // b processes its own inputs (it is their origin); kill it once while it does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !b.log().contains("starting function") {
        assert!(std::time::Instant::now() < deadline, "b never started the function\n{}", b.log());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    b.kill9();
    b.start_again();
    wait_for_outputs(&[&a, &b], "acme/sensors/clean", 2 * N).await;
    for node in [&a, &b] {
        let seen = crate::support::read_seqs(node, "acme/sensors/clean", 2 * N, |_| {}).await;
        let by_input: Vec<(String, Vec<u64>)> = seen
            .into_iter()
            .map(|(producer, mut seqs)| {
                seqs.sort_unstable();
                (producer.rsplit('/').next().expect("input producer").to_string(), seqs)
            })
            .collect();
        let want: Vec<(String, Vec<u64>)> = ["pa", "pb"].iter().map(|p| (p.to_string(), (0..N).collect())).collect();
        assert_eq!(by_input, want, "on {}: every input's output once, from one producer per input producer", node.addr);
    }
    // Both nodes run it, caught up, with nothing failed.
    for node in [&a, &b] {
        let stats = node.client().await.stats().await.expect("stats");
        let f = stats.functions.iter().find(|f| f.name == "acme/sensors/norm").expect("function stats");
        assert_eq!((f.lag_messages, f.failed, f.dead_lettered), (0, 0, 0), "{f:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_killed_mid_run_emits_each_rolling_mean_once_and_right() {
    use rill_node::client::Outgoing;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = crate::support::TestNode::start(dir.path(), "agg");
    let wasm = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions/examples/rolling_mean.wasm");
    let wasm = wasm.display().to_string();
    let args = ["fn", "create", "acme/fx/mean", "--wasm", &wasm, "--input", "acme/raw/t", "--output", "acme/mean/t"];
    let out = node.cli(&[&args[..], &["--param", "window=5"]].concat(), "");
    assert!(out.status.success(), "fn create: {}", text(&out.stderr));
    // Reading i comes from device i % 10 and reads i.
    const N: u64 = 30_000;
    const DEVICES: u64 = 10;
    let produce = async |node: &crate::support::TestNode, seqs: std::ops::Range<u64>| {
        let client = node.client().await;
        let mut p = client.producer_with_seqs("acme/raw/t", "sensors".into()).await.expect("producer");
        for chunk in seqs.step_by(1000) {
            let batch = (chunk..chunk + 1000).map(|i| {
                let mut m = Outgoing::payload(format!("{{\"t\":{i}}}")).with_seq(i);
                m.key = Some(format!("dev-{}", i % DEVICES).into_bytes());
                m
            });
            p.send(batch.collect()).await.expect("send");
        }
        p.close().await.expect("acked");
        client.close().await;
    };
    // A third of the readings, all processed, and time for the checkpoint to reach the
    // disk (the metadata store syncs every 500 ms); then kill -9: the restarted node must
    // carry on from the states stored with its cursor.
    produce(&node, 0..N / 3).await;
    wait_for_end(&node, "acme/mean/t", N / 3).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    node.restart();
    // The rest, with two more kills while the function works through them.
    produce(&node, N / 3..N).await;
    kill_twice_partway(&mut node, "acme/mean/t", N).await;
    // The mean at reading i: of the device's last five readings i, i - 10, ... (fewer at
    // first), exactly, as the guest formats it.
    let want = |i: u64| {
        let window: Vec<u64> = (0..5).map(|k| i as i64 - 10 * k).filter(|v| *v >= 0).map(|v| v as u64).collect();
        let (sum, n) = (window.iter().sum::<u64>() * 1_000_000, window.len() as u64);
        let micros = (sum + n / 2) / n;
        let mean = if micros % 1_000_000 == 0 {
            (micros / 1_000_000).to_string()
        } else {
            format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000).trim_end_matches('0').to_string()
        };
        format!("{{\"mean\":{mean},\"n\":{n}}}")
    };
    let mut seen = std::collections::BTreeMap::new();
    crate::support::read_seqs(&node, "acme/mean/t", N, |m| {
        let seq = m.message.id.seq;
        assert_eq!(text(&m.message.payload), want(seq), "the rolling mean at reading {seq}");
        assert_eq!(m.message.key.as_deref(), Some(format!("dev-{}", seq % DEVICES).as_bytes()));
        *seen.entry(seq).or_insert(0) += 1;
    })
    .await;
    assert_eq!(seen.len() as u64, N, "every reading's mean");
    assert!(seen.values().all(|n| *n == 1), "each once");
}

/// Produces readings `seqs` on `node` as `producer` (payload `{"seq":i,"t":i}`).
async fn produce_readings(node: &crate::support::TestNode, topic: &str, producer: &str, seqs: std::ops::Range<u64>) {
    use rill_node::client::Outgoing;
    let client = node.client().await;
    let mut p = client.producer_with_seqs(topic, producer.into()).await.expect("producer");
    for chunk in seqs.clone().step_by(500) {
        let batch = (chunk..(chunk + 500).min(seqs.end))
            .map(|i| Outgoing::payload(format!("{{\"seq\":{i},\"t\":{i}}}")).with_seq(i));
        p.send(batch.collect()).await.expect("send");
    }
    p.close().await.expect("acked");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_node_leaves_a_function_another_takes_over_what_it_left_undone_once() {
    let mesh = crate::mesh::MeshDir::on(&[("a", "127.0.0.1"), ("b", "127.0.0.1")]);
    mesh.configure("a", &["b"], &[]);
    mesh.configure("b", &[], &["a"]);
    let a = mesh.start("a");
    let mut b = mesh.start("b");
    crate::mesh::create_namespace(&a, &["a", "b"]).await;
    let scale = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions/examples/scale.wasm");
    let scale = scale.display().to_string();
    let out_topic = "acme/sensors/clean";
    let fn_cli = |node: &crate::support::TestNode, args: &[&str]| {
        let out = node.cli(&[&["fn"][..], args].concat(), "");
        assert!(out.status.success(), "fn {args:?}: {}", text(&out.stderr));
    };
    let create =
        ["create", "acme/sensors/norm", "--wasm", &scale, "--input", crate::mesh::TOPIC, "--output", out_topic];
    fn_cli(&a, &create);
    // b processes its first 2,000 readings itself (it is their origin).
    while !b.log().contains("starting function") {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    produce_readings(&b, crate::mesh::TOPIC, "pb", 0..2_000).await;
    wait_for_outputs(&[&a, &b], out_topic, 2_000).await;
    // Paused, b takes 3,000 more and a 5,000; both replicate; then b is gone for good.
    fn_cli(&a, &["pause", "acme/sensors/norm"]);
    produce_readings(&b, crate::mesh::TOPIC, "pb", 2_000..5_000).await;
    produce_readings(&a, crate::mesh::TOPIC, "pa", 0..5_000).await;
    wait_for_end(&a, crate::mesh::TOPIC, 10_000).await;
    b.kill9();
    // a resumes among {a, b}: it does its own 5,000 and leaves b's alone.
    fn_cli(&a, &["resume", "acme/sensors/norm"]);
    wait_for_outputs(&[&a], out_topic, 7_000).await;
    // b leaves the function: a takes over b's 3,000 undone, and not b's 2,000 done.
    fn_cli(&a, &["update", "acme/sensors/norm", "--nodes", "a"]);
    wait_for_outputs(&[&a], out_topic, 10_000).await;
    let seen = crate::support::read_seqs(&a, out_topic, 10_000, |_| {}).await;
    let counts: Vec<(String, usize)> =
        seen.iter().map(|(p, s)| (p.rsplit('/').next().expect("producer").to_string(), s.len())).collect();
    assert_eq!(counts, [("pa".to_string(), 5_000), ("pb".to_string(), 5_000)]);
    let stats = a.client().await.stats().await.expect("stats");
    let f = stats.functions.iter().find(|f| f.name == "acme/sensors/norm").expect("function stats");
    assert_eq!((f.processed, f.skipped_held, f.lag_messages), (3_000, 0, 0), "only b's undone inputs: {f:?}");
    let got = a.cli(&["fn", "get", "acme/sensors/norm"], "");
    assert!(text(&got.stdout).contains("nodes    a"), "{}", text(&got.stdout));
}
