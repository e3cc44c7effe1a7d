//! The README's walk-through, run as a newcomer would: defaults, CLI only.
use crate::support::{TestNode, text};

#[test]
fn produce_consume_restart_consume_from_earliest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut node = TestNode::start(tmp.path(), "walk");
    let ca_before = std::fs::read(node.data_dir.join("certs/ca.pem")).expect("dev CA made on first start");

    let out = node.cli(&["produce", "acme/sensors/temp"], "21.5\n21.7\n22.0\n");
    assert!(out.status.success(), "produce failed: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("produced 3 message(s)"), "{}", text(&out.stderr));

    let out = node.cli(&["consume", "acme/sensors/temp", "--subscription", "s1", "-n", "3"], "");
    assert!(out.status.success(), "consume failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "21.5\n21.7\n22.0\n");

    node.stop();
    node.restart();
    let ca_after = std::fs::read(node.data_dir.join("certs/ca.pem")).expect("CA still there");
    assert_eq!(ca_before, ca_after, "dev certificates are reused after a restart");

    let out = node.cli(&["consume", "acme/sensors/temp", "--subscription", "s2", "--from", "earliest", "-n", "3"], "");
    assert_eq!(text(&out.stdout), "21.5\n21.7\n22.0\n", "{}", text(&out.stderr));

    // s1 acked all three before the restart: it continues with the next message only.
    let out = node.cli(&["produce", "acme/sensors/temp"], "22.4\n");
    assert!(out.status.success());
    let out = node.cli(&["consume", "acme/sensors/temp", "--subscription", "s1", "-n", "1"], "");
    assert_eq!(text(&out.stdout), "22.4\n");

    let out = node.cli(&["consume", "acme/sensors/temp", "-s", "s3", "--from", "2", "-n", "1", "--format", "json"], "");
    let line = text(&out.stdout);
    assert!(
        line.contains("\"offset\":2") && line.contains("\"payload\":\"22.0\"") && line.contains("\"origin\":\"walk\""),
        "{line}"
    );

    let out = node.cli(&["stats"], "");
    let stats = text(&out.stdout);
    assert!(stats.contains("acme/sensors/temp") && stats.contains("subscription s1"), "{stats}");
    let out = node.cli(&["topics", "list"], "");
    assert!(text(&out.stdout).contains("acme/sensors/temp"), "{}", text(&out.stdout));
}

/// Each run of a named producer with assigned seqs is a new session: a new epoch, seqs
/// from 0, and nothing of the earlier run's ids reused (wave 1 continued the earlier
/// run's sequence from what the node held, and a node that had not seen it reused ids).
#[test]
fn each_run_of_a_named_producer_is_a_new_epoch_and_nothing_is_overwritten() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "seq");
    for _ in 0..2 {
        let out = node.cli(&["produce", "t/n/x", "--producer", "gw-17"], "a\nb\n");
        assert!(text(&out.stderr).contains("produced 2 message(s)"), "{}", text(&out.stderr));
    }
    let out = node.cli(&["consume", "t/n/x", "-s", "s", "--until-end", "--format", "json"], "");
    let ids: Vec<(u64, u64)> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON"))
        .map(|m| (m["id"]["epoch"].as_u64().expect("epoch"), m["id"]["seq"].as_u64().expect("seq")))
        .collect();
    assert_eq!(ids.len(), 4, "{}", text(&out.stdout));
    assert!(ids[0].0 != 0 && ids[2].0 != 0 && ids[0].0 != ids[2].0, "two sessions, two epochs: {ids:?}");
    assert_eq!([ids[0].1, ids[1].1, ids[2].1, ids[3].1], [0, 1, 0, 1]);
}

#[test]
fn certs_init_makes_a_mesh_a_node_and_a_client_can_use() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path().join("certs");
    let args = ["certs", "init", "--dir", "certs", "--nodes", "edge-1,cloud-eu"].map(String::from);
    let out = crate::support::run(tmp.path(), &args, "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in ["ca.pem", "ca.key", "edge-1.pem", "edge-1.key", "cloud-eu.pem", "client.pem", "client.key"] {
        assert!(certs.join(f).exists(), "{f} missing");
    }
    let again = crate::support::run(tmp.path(), &args, "");
    assert!(!again.status.success() && text(&again.stderr).contains("already holds a CA"), "{}", text(&again.stderr));

    let config = tmp.path().join("edge.toml");
    let tls = "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/edge-1.pem\"\nkey = \"certs/edge-1.key\"\n";
    std::fs::write(&config, tls).expect("config");
    let node = TestNode::start_with(tmp.path(), "edge-1", &["--config", "edge.toml"]).expect("start");
    assert!(!node.data_dir.join("certs").exists(), "no dev certificates when [tls] is set");
    let out = node.cli(&["produce", "t/n/x", "--certs", "certs"], "hello\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = node.cli(&["consume", "t/n/x", "-s", "s", "-n", "1", "--certs", "certs"], "");
    assert_eq!(text(&out.stdout), "hello\n", "{}", text(&out.stderr));
}

/// What a script needs: read what is there and stop, stop when nothing comes, and the
/// topic list and catalogue as JSON.
#[test]
fn scripts_read_to_the_end_and_get_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "scripts");
    let out = node.cli(&["produce", "t/n/x"], "a\nb\nc\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // --until-end stops at the end as it was at the start, and a second run at once.
    let out = node.cli(&["consume", "t/n/x", "-s", "s", "--until-end"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "a\nb\nc\n");
    let started = std::time::Instant::now();
    let out = node.cli(&["consume", "t/n/x", "-s", "s", "--until-end"], "");
    assert!(out.status.success() && out.stdout.is_empty(), "{}", text(&out.stderr));
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "nothing to read: it exits at once");
    // --until-end on a topic that does not exist yet exits at once too.
    let out = node.cli(&["consume", "t/n/none", "-s", "s", "--until-end"], "");
    assert!(out.status.success() && out.stdout.is_empty(), "{}", text(&out.stderr));
    // --timeout ends a wait for messages that do not come.
    let started = std::time::Instant::now();
    let out = node.cli(&["consume", "t/n/x", "-s", "late", "--from", "latest", "--timeout", "1s"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no message for 1s"), "{}", text(&out.stderr));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let out = node.cli(&["consume", "t/n/x", "-s", "x", "--timeout", "0s"], "");
    assert!(!out.status.success() && text(&out.stderr).contains("at least 1s"), "{}", text(&out.stderr));
    // JSON for scripts.
    let out = node.cli(&["topics", "list", "--json"], "");
    let topics: serde_json::Value = serde_json::from_slice(&out.stdout).expect("topics list --json is JSON");
    let x = topics.as_array().expect("an array").iter().find(|t| t["topic"] == "t/n/x").expect("t/n/x listed");
    assert_eq!(x["end_offset"], 3);
    let out = node.cli(&["ns", "create", "t/n"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = node.cli(&["ns", "get", "--json"], "");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ns get --json is JSON");
    assert_eq!(doc["t/n"]["on_full"], "reject", "{doc}");
    assert!(doc["t/n"]["clusters"].is_array(), "{doc}");
    let out = node.cli(&["ns", "get", "t/none", "--json"], "");
    assert!(!out.status.success() && text(&out.stderr).contains("does not exist"), "{}", text(&out.stderr));
}
