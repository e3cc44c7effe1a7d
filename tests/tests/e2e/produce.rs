//! Produce under tight limits: the node's byte budget makes producers wait, never stall.
use rill_node::client::Outgoing;

use crate::support::{self, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_of_one_frame_still_stores_every_pipelined_batch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("tight.toml");
    let limits = "[limits]\nmessage_bytes_max = 4096\nframe_bytes_max = 69632\nproduce_inflight_bytes_max = 69632\n\
                  delivery_bytes_max = 34816\n";
    std::fs::write(&config, limits).expect("config");
    let node =
        TestNode::start_with(tmp.path(), "tight", &["--config", config.to_str().expect("utf-8")]).expect("start");
    let client = node.client().await;
    let mut p = client.producer("t/n/x", "p".into()).await.expect("producer");
    // 40 batches of ~60 KB, 8 in flight: the node can hold only one at a time.
    let mut acked = 0;
    for _ in 0..40 {
        while p.in_flight() >= 8 {
            acked += p.next_ack().await.expect("ack").results.len();
        }
        p.send((0..15).map(|_| Outgoing::payload(vec![7u8; 4000])).collect()).await.expect("send");
    }
    for ack in p.flush().await.expect("acks") {
        acked += ack.results.len();
    }
    assert_eq!(acked, 600);
    let stats = client.stats().await.expect("stats");
    assert_eq!(stats.topics.iter().find(|t| t.topic == "t/n/x").map(|t| t.end_offset), Some(600));
}

/// `rill produce --seq-from-line --acks` killed mid-file and run again over the same file
/// stores every line once: the rerun's resends carry the same ids and are duplicates.
#[test]
fn a_produce_killed_mid_file_and_rerun_with_seqs_from_lines_stores_each_line_once() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "rerun");
    let lines = 20_000u64;
    let file = tmp.path().join("readings.txt");
    let text: String = (1..=lines).map(|i| format!("reading {i}\n")).collect();
    std::fs::write(&file, text).expect("input");
    let file_arg = file.display().to_string();
    let args = ["produce", "t/n/x", "--file", &file_arg, "--seq-from-line", "--acks", "--batch", "50", "--window", "2"];
    let mut first = std::process::Command::new(support::bin())
        .current_dir(&node.cwd)
        .args(args)
        .args(["--addr", &node.addr.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn rill produce");
    // Kill it once a few thousand lines are acknowledged (acks are printed as they come).
    let mut acked_first = 0u64;
    for line in BufReader::new(first.stdout.take().expect("stdout")).lines() {
        let ack: serde_json::Value = serde_json::from_str(&line.expect("a line")).expect("an ack line is JSON");
        assert_eq!(ack["producer"], "readings.txt", "the producer defaults to the file's name: {ack}");
        assert_eq!(ack["seq"], acked_first + 1, "acks come in line order: {ack}");
        acked_first += 1;
        if acked_first == 3_000 {
            let _ = first.kill();
            break;
        }
    }
    let _ = first.wait();
    let out = node.cli(&args, "");
    assert!(out.status.success(), "{}", support::text(&out.stderr));
    let acks: Vec<serde_json::Value> =
        support::text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!(acks.len() as u64, lines, "the rerun acknowledges every line");
    let duplicates = acks.iter().filter(|a| a["duplicate"] == true).count() as u64;
    assert!(duplicates >= acked_first, "{duplicates} duplicates, {acked_first} acknowledged before the kill");
    let out = node.cli(&["topics", "list", "--json"], "");
    let topics: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(topics[0]["end_offset"], lines, "each line stored once: {topics}");
    let conflicts = (&topics[0]["conflicts_refused"], &topics[0]["conflicts_kept"]);
    assert_eq!(conflicts, (&serde_json::json!(0), &serde_json::json!(0)), "a resend is never a conflict: {topics}");
    eprintln!(
        "rerun: {lines} lines, {acked_first} acknowledged before kill -9, rerun stored {} and found {duplicates} duplicates; {} stored in all, 0 conflicts",
        lines - duplicates,
        topics[0]["end_offset"]
    );
}

/// Acks are read as they arrive: at a slow line rate the reported batch latency is the
/// send-to-ack time, not the time to fill the window. Input errors name the line.
#[test]
fn slow_input_reports_send_to_ack_latency_and_bad_seq_fields_name_the_line() {
    use std::io::Write;
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "slow");
    let mut child = std::process::Command::new(support::bin())
        .current_dir(&node.cwd)
        .args(["produce", "t/n/x", "--addr", &node.addr.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn rill produce");
    let mut stdin = child.stdin.take().expect("stdin");
    for i in 0..40 {
        writeln!(stdin, "line {i}").expect("write");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(stdin);
    assert!(support::wait_exit(&mut child, support::CLI_TIMEOUT).is_some_and(|s| s.success()));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).expect("stderr");
    let p50: f64 = err
        .split("latency p50 ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no latency in: {err}"));
    // Before, acks were read only with 16 batches in flight: about 16 x 20 ms.
    assert!(p50 < 100.0, "p50 {p50} ms is not a send-to-ack time: {err}");
    let out = node.cli(&["produce", "t/n/y", "--seq-field", "n"], "{\"n\": 1}\n{\"m\": 2}\n");
    assert!(!out.status.success() && support::text(&out.stderr).contains("line 2 has no whole-number field 'n'"));
    let out = node.cli(&["produce", "t/n/y", "--seq-from-line"], "a\n");
    assert!(!out.status.success() && support::text(&out.stderr).contains("needs --producer"));
}
