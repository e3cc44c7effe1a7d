//! The mesh end to end: real nodes on loopback replicating namespaces to each other.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use rill_node::client::{Client, Outgoing};
use rill_replication::namespace::Edit;
use tokio::time::Instant;

use crate::support::{TestNode, nodes, read_seqs, replicates};

pub(crate) const TOPIC: &str = "acme/sensors/temp";

/// A mesh directory: one CA, a certificate per node, a config and a working dir per node.
pub(crate) struct MeshDir {
    root: tempfile::TempDir,
    pub(crate) addrs: BTreeMap<String, SocketAddr>,
}

/// A free UDP port on `ip`.
fn free_addr(ip: &str) -> SocketAddr {
    let socket = std::net::UdpSocket::bind((ip, 0)).expect("bind");
    socket.local_addr().expect("addr")
}

impl MeshDir {
    fn new(names: &[&str]) -> MeshDir {
        Self::on(&names.iter().map(|n| (*n, "127.0.0.1")).collect::<Vec<_>>())
    }

    /// Nodes each on its own loopback address, as `(name, ip)`.
    pub(crate) fn on(nodes: &[(&str, &str)]) -> MeshDir {
        let root = tempfile::tempdir().expect("tempdir");
        let certs = root.path().join("certs");
        let names: Vec<&str> = nodes.iter().map(|(n, _)| *n).collect();
        rill_transport::certs::create_mesh(&certs, &names).expect("mesh certificates");
        let addrs = nodes.iter().map(|(n, ip)| (n.to_string(), free_addr(ip))).collect();
        MeshDir { root, addrs }
    }

    pub(crate) fn certs(&self) -> PathBuf {
        self.root.path().join("certs")
    }

    /// The working dir of node `name` (its config is `node.toml` there).
    pub(crate) fn node_dir(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Writes `name`'s config: peers it dials (with address) and peers that dial it.
    pub(crate) fn configure(&self, name: &str, dials: &[&str], dialed_by: &[&str]) {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).expect("node dir");
        let c = self.certs();
        let mut text = format!(
            "name = \"{name}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            c.join("ca.pem").display(),
            c.join(format!("{name}.pem")).display(),
            c.join(format!("{name}.key")).display()
        );
        for p in dials {
            text.push_str(&format!("[[peers]]\nname = \"{p}\"\naddr = \"{}\"\n", self.addrs[*p]));
        }
        for p in dialed_by {
            text.push_str(&format!("[[peers]]\nname = \"{p}\"\n"));
        }
        std::fs::write(dir.join("node.toml"), text).expect("config");
    }

    pub(crate) fn start(&self, name: &str) -> TestNode {
        let dir = self.root.path().join(name);
        let mut node = TestNode::start_at(&dir, name, self.addrs[name], &["--config", "node.toml"])
            .unwrap_or_else(|e| panic!("{name} did not start: {e}"));
        node.certs = self.certs();
        node
    }

    fn path(&self) -> &Path {
        self.root.path()
    }
}

async fn produce(node: &TestNode, producer: &str, count: u64) {
    let client = node.client().await;
    let mut p = client.producer(TOPIC, producer.into()).await.expect("producer");
    let first = p.next_seq();
    for chunk in 0..count.div_ceil(500) {
        let n = 500.min(count - chunk * 500);
        let batch = (0..n).map(|i| Outgoing::payload(format!("{producer}-{}", first + chunk * 500 + i))).collect();
        while p.in_flight() >= 8 {
            p.next_ack().await.expect("ack");
        }
        p.send(batch).await.expect("send");
    }
    p.close().await.expect("acks");
    client.close().await;
}

pub(crate) async fn end_offset(node: &TestNode) -> u64 {
    let Ok(client) = Client::connect(&node.options()).await else { return 0 };
    let stats = client.stats().await.map(|s| s.topics).unwrap_or_default();
    client.close().await;
    stats.iter().find(|t| t.topic == TOPIC).map_or(0, |t| t.end_offset)
}

/// Waits until every node holds `want` messages of the topic.
async fn converge(nodes: &[&TestNode], want: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut ends = Vec::new();
        for n in nodes {
            ends.push(end_offset(n).await);
        }
        if ends.iter().all(|&e| e == want) {
            return;
        }
        assert!(ends.iter().all(|&e| e <= want), "a node holds more than was produced: {ends:?} > {want}");
        assert!(Instant::now() < deadline, "no convergence to {want}: {ends:?}\n{}", nodes[0].log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads the whole topic on `node` and checks: each (producer, seq) once, per-producer
/// order, and exactly the expected seqs `0..count` for every producer.
async fn check_exactly_once_in_order(node: &TestNode, producers: &BTreeMap<String, u64>) {
    let total: u64 = producers.values().sum();
    let seen = read_seqs(node, TOPIC, total, |_| {}).await;
    for (producer, &count) in producers {
        let seqs = seen.get(producer).cloned().unwrap_or_default();
        assert_eq!(seqs, (0..count).collect::<Vec<_>>(), "{producer} on {}: exactly once, in order", node.addr);
    }
}

pub(crate) async fn create_namespace(node: &TestNode, clusters: &[&str]) {
    let client = node.client().await;
    client.ns_edit("acme/sensors", Edit::Create).await.expect("create");
    client.ns_edit("acme/sensors", Edit::SetClusters(nodes(clusters))).await.expect("set clusters");
    client.close().await;
}

/// Waits up to 20 s until `node` knows `acme/sensors` (the catalogue reached it).
pub(crate) async fn await_namespace(node: &TestNode) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.client().await.ns_get().await.expect("ns get").get("acme/sensors").is_none() {
        assert!(Instant::now() < deadline, "{} never learned the namespace", node.name);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn chain(mesh: &MeshDir) {
    // edge dials r1 only; r1 and r2 dial each other.
    mesh.configure("edge", &["r1"], &[]);
    mesh.configure("r1", &["r2"], &["edge"]);
    mesh.configure("r2", &["r1"], &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_backlog_reaches_both_regions_through_its_one_uplink() {
    let mesh = MeshDir::new(&["edge", "r1", "r2"]);
    chain(&mesh);
    let edge = mesh.start("edge");
    create_namespace(&edge, &["edge", "r1", "r2"]).await;
    // Uplink down (r1 not running): the edge keeps accepting writes.
    produce(&edge, "sensor-a", 3000).await;
    produce(&edge, "sensor-b", 2000).await;
    let r2 = mesh.start("r2");
    let r1 = mesh.start("r1");
    converge(&[&edge, &r1, &r2], 5000).await;
    let producers: BTreeMap<String, u64> = [("sensor-a".to_string(), 3000), ("sensor-b".to_string(), 2000)].into();
    for node in [&r1, &r2] {
        check_exactly_once_in_order(node, &producers).await;
    }
    let client = r2.client().await;
    let doc = client.ns_get().await.expect("ns get");
    assert!(replicates(&doc, "acme/sensors", "edge", "r2"), "the catalogue reached r2 through r1");
    let stats = r1.client().await.stats().await.expect("stats");
    let lanes: Vec<u64> = stats.peers.iter().flat_map(|p| p.lanes.iter().map(|l| l.lag_messages)).collect();
    assert!(!lanes.is_empty() && lanes.iter().all(|&l| l == 0), "r1 reports no lag: {:?}", stats.peers);
    let from_edge = stats.peers.iter().find(|p| p.name == "edge").expect("edge peer");
    assert!(from_edge.connected);
    assert_eq!(from_edge.lanes.iter().map(|l| l.received).sum::<u64>(), 5000, "{:?}", from_edge.lanes);
    let edge_stats = edge.client().await.stats().await.expect("edge stats");
    let to_r1 = edge_stats.peers.iter().find(|p| p.name == "r1").expect("r1 peer");
    assert_eq!(to_r1.lanes.iter().map(|l| l.sent).sum::<u64>(), 5000, "{:?}", to_r1.lanes);
    assert!(
        to_r1.link_bytes_sent > 5000 * "sensor-a-0".len() as u64,
        "the link carried the payloads: {}",
        to_r1.link_bytes_sent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_every_node_at_once_converge_and_a_region_killed_mid_catch_up_loses_nothing() {
    let mesh = MeshDir::new(&["edge", "r1", "r2"]);
    chain(&mesh);
    let edge = mesh.start("edge");
    let mut r1 = mesh.start("r1");
    let r2 = mesh.start("r2");
    create_namespace(&r2, &["edge", "r1", "r2"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // let the catalogue spread
    tokio::join!(produce(&edge, "at-edge", 4000), produce(&r1, "at-r1", 1000), produce(&r2, "at-r2", 1000));
    // Kill r1 (the relay) while it catches up, then bring it back.
    tokio::time::sleep(Duration::from_millis(100)).await;
    r1.kill9();
    produce(&edge, "during-outage", 1000).await;
    r1.restart();
    converge(&[&edge, &r1, &r2], 7000).await;
    let producers: BTreeMap<String, u64> =
        [("at-edge", 4000), ("at-r1", 1000), ("at-r2", 1000), ("during-outage", 1000)]
            .into_iter()
            .map(|(p, n)| (p.to_string(), n))
            .collect();
    for node in [&edge, &r1, &r2] {
        check_exactly_once_in_order(node, &producers).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_edits_on_partitioned_nodes_converge_after_heal() {
    // a and b reach each other only through r; killing r partitions them.
    let mesh = MeshDir::new(&["a", "r", "b"]);
    mesh.configure("a", &["r"], &[]);
    mesh.configure("b", &["r"], &[]);
    mesh.configure("r", &[], &["a", "b"]);
    let a = mesh.start("a");
    let b = mesh.start("b");
    let ca = a.client().await;
    let cb = b.client().await;
    ca.ns_edit("acme/sensors", Edit::Create).await.expect("create on a");
    ca.ns_edit("acme/sensors", Edit::SetClusters(nodes(&["a", "r"]))).await.expect("edit on a");
    cb.ns_edit("acme/sensors", Edit::Create).await.expect("create on b");
    tokio::time::sleep(Duration::from_millis(20)).await; // b's edit is the later one
    cb.ns_edit("acme/sensors", Edit::SetClusters(nodes(&["b", "r"]))).await.expect("edit on b");
    ca.ns_edit("acme/sensors", Edit::RetentionAge(Some(3600))).await.expect("policy on a");
    let r = mesh.start("r");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let docs =
            [ca.ns_get().await.expect("a"), cb.ns_get().await.expect("b"), r.client().await.ns_get().await.expect("r")];
        if docs[0] == docs[1] && docs[1] == docs[2] {
            let p = docs[0].get("acme/sensors").expect("namespace");
            assert_eq!(p.clusters.val, nodes(&["b", "r"]), "the later edit wins");
            assert_eq!(p.retention_age_s.val, Some(3600), "a's edit of another field survives");
            break;
        }
        assert!(Instant::now() < deadline, "no convergence: {docs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let mesh = MeshDir::new(&["r1", "r2"]);
    mesh.configure("r1", &[], &["r2"]);
    // An impostor "r2" with its own CA dials r1.
    let foreign = mesh.path().join("foreign");
    rill_transport::certs::create_ca(&foreign).expect("foreign CA");
    rill_transport::certs::issue_node(&foreign, "r2").expect("impostor cert");
    std::fs::copy(mesh.certs().join("ca.pem"), foreign.join("ca.pem")).expect("trust r1's CA");
    let dir = mesh.path().join("impostor");
    std::fs::create_dir_all(&dir).expect("dir");
    let config = format!(
        "name = \"r2\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[[peers]]\nname = \"r1\"\naddr = \"{}\"\n",
        foreign.join("ca.pem").display(),
        foreign.join("r2.pem").display(),
        foreign.join("r2.key").display(),
        mesh.addrs["r1"]
    );
    std::fs::write(dir.join("node.toml"), config).expect("config");
    let r1 = mesh.start("r1");
    let _impostor =
        TestNode::start_at(&dir, "r2", mesh.addrs["r2"], &["--config", "node.toml"]).expect("impostor starts");
    assert!(r1.wait_for_log("client handshake failed"), "r1 refuses the foreign certificate:\n{}", r1.log());
    let stats = r1.client().await.stats().await.expect("stats");
    assert!(stats.peers.iter().all(|p| !p.connected), "no link to the impostor: {:?}", stats.peers);
}
