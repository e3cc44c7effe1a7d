//! A producer name that fails over between two partitioned nodes (issue 13's second
//! report): real nodes on 127.0.0.5 and .6, cut apart with nftables (needs root and `nft`,
//! as the partition test), written to through both sides, then healed.
use std::{collections::BTreeMap, time::Duration};

use rill_node::client::Outgoing;
use rill_storage::MessageId;
use tokio::time::Instant;

use crate::{
    mesh::{MeshDir, TOPIC, await_namespace, create_namespace},
    partition::Firewall,
    support::{TestNode, read_seqs, text},
};

const A: (&str, &str) = ("fa", "127.0.0.5");
const B: (&str, &str) = ("fb", "127.0.0.6");

/// Everything `node` holds of the topic: payload per id (the count is known).
async fn contents(node: &TestNode, count: u64) -> BTreeMap<MessageId, String> {
    let mut held = BTreeMap::new();
    let mut twice = Vec::new();
    read_seqs(node, TOPIC, count, |m| {
        if held.insert(m.message.id.clone(), text(&m.message.payload)).is_some() {
            twice.push(m.message.id.clone());
        }
    })
    .await;
    assert!(twice.is_empty(), "{} holds ids twice: {twice:?}", node.name);
    held
}

/// Waits until `node` holds `count` messages and has kept `conflicts` aside.
async fn settle(node: &TestNode, count: u64, conflicts: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = node.client().await.stats().await.expect("stats");
        let topic = stats.topics.iter().find(|t| t.topic == TOPIC);
        let seen = topic.map_or((0, 0), |t| (t.end_offset, t.conflicts_kept));
        if seen == (count, conflicts) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: (messages, conflicts kept) {seen:?}, want {:?}",
            node.name,
            (count, conflicts)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_failing_over_between_partitioned_nodes_stores_each_message_once_and_never_an_id_twice() {
    let mesh = MeshDir::on(&[A, B]);
    mesh.configure("fa", &["fb"], &[]);
    mesh.configure("fb", &[], &["fa"]);
    let (fa, fb) = (mesh.start("fa"), mesh.start("fb"));
    create_namespace(&fa, &["fa", "fb"]).await;
    await_namespace(&fb).await;
    let mut firewall = Firewall::new(13);
    firewall.cut_ips(A.1, B.1);

    // Caller-chosen seqs: lines 1-30 through fa; then the device, restarted without
    // memory, sends its whole 40-line file through fb.
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, all) = (dir.path().join("first.txt"), dir.path().join("all.txt"));
    let lines = |n: u64| (1..=n).map(|i| format!("reading {i}\n")).collect::<String>();
    std::fs::write(&first, lines(30)).expect("input");
    std::fs::write(&all, lines(40)).expect("input");
    for (node, file) in [(&fa, &first), (&fb, &all)] {
        let file = file.display().to_string();
        let out = node.cli(&["produce", TOPIC, "--file", &file, "--seq-from-line", "--producer", "gw"], "");
        assert!(out.status.success(), "produce through {}: {}", node.name, text(&out.stderr));
    }

    // Assigned seqs: a session through each side, 10 messages each.
    for (node, side) in [(&fa, "a"), (&fb, "b")] {
        let client = node.client().await;
        let mut p = client.producer(TOPIC, "asg".into()).await.expect("producer");
        p.send((0..10).map(|i| Outgoing::payload(format!("asg {side} {i}"))).collect()).await.expect("send");
        p.close().await.expect("acks");
    }

    // Two devices sharing one name break the promise: each side stores its own twin:1.
    for node in [&fa, &fb] {
        let client = node.client().await;
        let mut p = client.producer_with_seqs(TOPIC, "twin".into()).await.expect("producer");
        p.send(vec![Outgoing::payload(format!("twin from {}", node.name)).with_seq(1)]).await.expect("send");
        p.close().await.expect("acks");
    }

    firewall.heal_ips(A.1, B.1);
    // 40 lines + 20 assigned + one twin each; the other side's twin is kept aside.
    settle(&fa, 61, 1).await;
    settle(&fb, 61, 1).await;
    let (on_a, on_b) = (contents(&fa, 61).await, contents(&fb, 61).await);
    let gw: Vec<(u64, &String)> =
        on_a.iter().filter(|(id, _)| &*id.producer.0 == "gw").map(|(id, p)| (id.seq, p)).collect();
    let want: Vec<String> = (1..=40).map(|i| format!("reading {i}")).collect();
    assert_eq!(gw.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=40).collect::<Vec<_>>(), "every line once");
    assert!(gw.iter().zip(&want).all(|((_, p), w)| *p == w), "each line under its own seq: {gw:?}");
    for (id, payload) in &on_a {
        if &*id.producer.0 != "twin" {
            assert_eq!(on_b.get(id), Some(payload), "{id} differs between the nodes");
        }
    }
    let asg: Vec<&MessageId> = on_a.keys().filter(|id| &*id.producer.0 == "asg").collect();
    assert_eq!(asg.len(), 20, "both sessions' messages, each under its own id");
    let twin = MessageId::chosen("twin", 1);
    assert_eq!(
        (on_a[&twin].as_str(), on_b[&twin].as_str()),
        ("twin from fa", "twin from fb"),
        "each log keeps its first"
    );

    // Neither acknowledged twin disappeared: each node keeps the other's aside.
    for (node, other) in [(&fa, "fb"), (&fb, "fa")] {
        let kept = node.client().await.list_conflicts(Some(TOPIC)).await.expect("conflicts");
        let seen: Vec<(String, String)> =
            kept.iter().map(|k| (k.message.id.to_string(), text(&k.message.payload))).collect();
        assert_eq!(seen, [("twin:1".to_string(), format!("twin from {other}"))], "on {}", node.name);
        let listed = node.cli(&["conflicts", "list"], "");
        assert!(text(&listed.stdout).contains("twin:1"), "rill conflicts list: {}", text(&listed.stdout));
    }

    // Reusing the id for a third content is refused at produce, naming the id.
    let client = fa.client().await;
    let mut p = client.producer_with_seqs(TOPIC, "twin".into()).await.expect("producer");
    let _ = p.send(vec![Outgoing::payload("a third content").with_seq(1)]).await;
    let refused = p.flush().await.expect_err("a conflicting produce is refused").to_string();
    assert!(refused.contains("twin:1 conflicts"), "{refused}");
    let stats = client.stats().await.expect("stats");
    let topic = stats.topics.iter().find(|t| t.topic == TOPIC).expect("the topic");
    assert_eq!((topic.end_offset, topic.conflicts_refused), (61, 1));
}
