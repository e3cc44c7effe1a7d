//! The core driven as a whole mesh in memory: links, partitions, crashes, relays.
use std::{
    collections::{BTreeSet, VecDeque},
    sync::Arc,
};

use rill_storage::{MessageId, ProducerId, StoredMessage, dedup::DedupIndex};

use super::*;

fn nn(name: &str) -> NodeName {
    NodeName::parse(name).unwrap()
}

fn ns(name: &str) -> NamespaceName {
    NamespaceName::parse(name).unwrap()
}

/// Accepts a catalogue entry whose signature reads "ok".
#[derive(Debug)]
struct SignedOk;

impl crate::access::Verify for SignedOk {
    fn verify(&self, signed: &crate::access::Signed) -> Result<(), String> {
        if signed.signature == b"ok" { Ok(()) } else { Err("bad signature".into()) }
    }
}

/// A node of the in-memory mesh: the core plus a log with dedup, as the driver has.
#[derive(Debug)]
struct Node {
    rep: Replicator,
    logs: BTreeMap<TopicName, Vec<StoredMessage>>,
    dedup: BTreeMap<TopicName, DedupIndex>,
    cursors: BTreeMap<(String, TopicName), u64>,
    /// Appends fail while set (a failing disk).
    disk_fails: bool,
    /// The blob store, by hash (a test may damage one's bytes).
    blobs: BTreeMap<rill_storage::blobs::Hash, Vec<u8>>,
}

impl Node {
    fn new(name: &str, boot: u64, settings: Settings, config: ConfigDoc) -> Node {
        let rep = Replicator::new(nn(name), boot, settings, config, Arc::new(SignedOk));
        let (logs, dedup, cursors, blobs) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        Node { rep, logs, dedup, cursors, disk_fails: false, blobs }
    }

    /// Appends what is not held yet; returns the new end offset and the duplicates.
    fn append(&mut self, topic: &TopicName, messages: Vec<Message>) -> (u64, u64) {
        let log = self.logs.entry(topic.clone()).or_default();
        let dedup = self.dedup.entry(topic.clone()).or_default();
        let mut duplicates = 0;
        for m in messages {
            if dedup.contains(&m.id) {
                duplicates += 1;
            } else {
                let offset = log.len() as u64;
                dedup.record(&m, offset);
                log.push(StoredMessage { offset, message: m });
            }
        }
        (log.len() as u64, duplicates)
    }

    fn holds(&self) -> Vec<(TopicName, Summary)> {
        self.dedup.iter().map(|(t, d)| (t.clone(), Summary::of(d))).collect()
    }
}

/// Deterministic pseudo-random numbers for delivery order and faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One connection: who dialed whom, and whether it is still open.
#[derive(Debug, Clone)]
struct Conn {
    dialer: String,
    acceptor: String,
    open: bool,
}

/// Nodes, paths between them (up or down), connections over the paths, and messages on
/// the wire (FIFO per connection and direction).
struct Mesh {
    nodes: BTreeMap<String, Node>,
    paths: BTreeMap<(String, String), bool>,
    conns: BTreeMap<LinkId, Conn>,
    wire: BTreeMap<(LinkId, String), VecDeque<PeerMessage>>,
    next_link: u64,
    now_ms: u64,
    rng: Rng,
    produced: Vec<(String, TopicName, MessageId)>,
    /// Messages carried in batches on all links.
    batch_messages_sent: usize,
    /// Links closed by a core, with the reason.
    closed: Vec<(String, LinkId, CloseReason)>,
    /// Whether `run` lets time pass when nothing moves (for candidates to expire).
    time_jumps: bool,
}

fn topic(name: &str) -> TopicName {
    TopicName::parse(name).unwrap()
}

fn key(a: &str, b: &str) -> (String, String) {
    if a < b { (a.into(), b.into()) } else { (b.into(), a.into()) }
}

fn settings() -> Settings {
    Settings { batch_messages_max: 7, batch_bytes_max: 1 << 20, inflight_batches_max: 3, ..Settings::default() }
}

impl Mesh {
    /// Nodes with the given paths (all down at first) and namespace `t/ns` held by all.
    fn new(names: &[&str], paths: &[(&str, &str)], seed: u64) -> Mesh {
        let mut nodes = BTreeMap::new();
        for (i, &n) in names.iter().enumerate() {
            nodes.insert(n.to_string(), Node::new(n, 1000 + i as u64, settings(), ConfigDoc::default()));
        }
        let mut mesh = Mesh {
            nodes,
            paths: BTreeMap::new(),
            conns: BTreeMap::new(),
            wire: BTreeMap::new(),
            next_link: 0,
            now_ms: 0,
            rng: Rng(seed | 1),
            produced: Vec::new(),
            batch_messages_sent: 0,
            closed: Vec::new(),
            time_jumps: true,
        };
        for &(a, b) in paths {
            mesh.paths.insert(key(a, b), false);
            mesh.node(a).rep.add_peer(nn(b));
            mesh.node(b).rep.add_peer(nn(a));
        }
        let first = names[0];
        let all: BTreeSet<NodeName> = names.iter().map(|s| nn(s)).collect();
        mesh.node(first).rep.edit_config(&ns("t/ns"), Edit::Create, 1).unwrap();
        mesh.node(first).rep.edit_config(&ns("t/ns"), Edit::SetClusters(all), 2).unwrap();
        mesh
    }

    fn node(&mut self, n: &str) -> &mut Node {
        self.nodes.get_mut(n).unwrap()
    }

    fn produce(&mut self, node: &str, t: &str, producer: &str, seqs: std::ops::Range<u64>) {
        let t = topic(t);
        let messages: Vec<Message> = seqs
            .map(|seq| Message {
                id: MessageId { producer: ProducerId(producer.into()), epoch: 0, seq },
                origin: node.into(),
                publish_time_ms: 0,
                key: None,
                headers: Vec::new(),
                payload: format!("{producer}-{seq}").into_bytes(),
            })
            .collect();
        for m in &messages {
            self.produced.push((node.to_string(), t.clone(), m.id.clone()));
        }
        let n = self.node(node);
        let (end, _) = n.append(&t, messages);
        n.rep.handle_log_grew(&t, end);
    }

    /// Opens a new connection from `dialer` to `acceptor`; both ends learn of it now.
    fn dial(&mut self, dialer: &str, acceptor: &str) -> LinkId {
        self.next_link += 1;
        let id = LinkId(self.next_link);
        self.conns.insert(id, Conn { dialer: dialer.into(), acceptor: acceptor.into(), open: true });
        let now = self.now_ms;
        self.node(dialer).rep.handle_link_opened(now, &nn(acceptor), id, true);
        self.node(acceptor).rep.handle_link_opened(now, &nn(dialer), id, false);
        id
    }

    /// Closes a connection; both ends learn of it now, and what was on the wire is gone.
    fn close(&mut self, id: LinkId) {
        let Some(conn) = self.conns.get_mut(&id).filter(|c| c.open) else { return };
        conn.open = false;
        let (a, b) = (conn.dialer.clone(), conn.acceptor.clone());
        self.wire.retain(|(l, _), _| *l != id);
        let now = self.now_ms;
        self.node(&a).rep.handle_link_closed(now, &nn(&b), id);
        self.node(&b).rep.handle_link_closed(now, &nn(&a), id);
    }

    fn open_conns(&self, a: &str, b: &str) -> Vec<LinkId> {
        let k = key(a, b);
        self.conns.iter().filter(|(_, c)| c.open && key(&c.dialer, &c.acceptor) == k).map(|(id, _)| *id).collect()
    }

    /// Brings a path up (the smaller name dials) or down (every connection on it closes).
    fn set_link(&mut self, a: &str, b: &str, up: bool) {
        let k = key(a, b);
        if self.paths.get(&k) == Some(&up) {
            return;
        }
        self.paths.insert(k.clone(), up);
        if up {
            self.dial(&k.0, &k.1);
        } else {
            for id in self.open_conns(a, b) {
                self.close(id);
            }
        }
    }

    /// Executes one node's pending actions.
    fn drain(&mut self, name: &str) -> bool {
        let mut any = false;
        while let Some(action) = self.node(name).rep.poll_action() {
            any = true;
            match action {
                Action::Send { peer, link, message } => self.send(name, peer.as_str(), link, message),
                Action::Greet { peer, link } => {
                    let n = self.node(name);
                    let hello = n.rep.hello(n.holds());
                    self.send(name, peer.as_str(), link, hello);
                }
                Action::Read { peer, topic, from, max_messages, ticket, .. } => {
                    let n = self.node(name);
                    let log = n.logs.get(&topic).cloned().unwrap_or_default();
                    let batch: Vec<StoredMessage> = log.into_iter().skip(from as usize).take(max_messages).collect();
                    n.rep.handle_read(&peer, &topic, ticket, batch);
                }
                Action::Append { peer, link, topic, batch, messages } => {
                    let now = self.now_ms;
                    let n = self.node(name);
                    if n.disk_fails {
                        n.rep.handle_appended(now, &peer, link, &topic, batch, Err("disk".into()));
                        continue;
                    }
                    let (end, duplicates) = n.append(&topic, messages);
                    n.rep.handle_log_grew(&topic, end);
                    n.rep.handle_appended(now, &peer, link, &topic, batch, Ok(duplicates));
                }
                Action::SaveCursor { peer, topic, offset } => {
                    self.node(name).cursors.insert((peer.to_string(), topic), offset);
                }
                Action::SaveConfig => {}
                Action::EntryRefused { .. } => {}
                Action::ReadBlob { peer, link, hash, offset, len } => {
                    let read = self.node(name).blobs.get(&hash).map(|bytes| {
                        let end = (offset + len).min(bytes.len() as u64);
                        (bytes.len() as u64, bytes[offset.min(end) as usize..end as usize].to_vec())
                    });
                    let messages = blobs::blob_chunks(hash, offset, read);
                    for message in messages {
                        self.send(name, peer.as_str(), link, message);
                    }
                }
                Action::StoreBlob { hash, bytes } => {
                    let n = self.node(name);
                    n.blobs.insert(hash, bytes);
                    n.rep.handle_blob_stored(hash);
                }
                Action::CloseLink { peer, link, reason } => {
                    self.closed.push((name.to_string(), link, reason));
                    let _ = peer;
                    self.close(link);
                }
            }
        }
        any
    }

    fn send(&mut self, from: &str, to: &str, link: LinkId, message: PeerMessage) {
        if let PeerMessage::Batch { messages, .. } = &message {
            self.batch_messages_sent += messages.len();
        }
        let open = self.conns.get(&link).is_some_and(|c| c.open);
        assert!(self.conns.get(&link).is_none_or(|c| key(&c.dialer, &c.acceptor) == key(from, to)));
        if open {
            self.wire.entry((link, from.to_string())).or_default().push_back(message);
        }
    }

    /// Delivers one message from a random connection with traffic.
    fn deliver_one(&mut self) -> bool {
        let busy: Vec<(LinkId, String)> =
            self.wire.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| k.clone()).collect();
        if busy.is_empty() {
            return false;
        }
        let (link, from) = busy[(self.rng.next() % busy.len() as u64) as usize].clone();
        let message = self.wire.get_mut(&(link, from.clone())).unwrap().pop_front().unwrap();
        let conn = &self.conns[&link];
        let to = if conn.dialer == from { conn.acceptor.clone() } else { conn.dialer.clone() };
        let now = self.now_ms;
        self.node(&to).rep.handle_message(now, &nn(&from), link, message);
        true
    }

    /// Runs until nothing moves; `flap` is the chance (per mille) that a step flaps a path.
    fn run(&mut self, flap_per_mille: u64) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for step in 0.. {
            assert!(step < 200_000, "the mesh did not settle");
            self.now_ms += 1;
            let mut moved = false;
            for n in &names {
                let now = self.now_ms;
                self.node(n).rep.handle_timeout(now);
                moved |= self.drain(n);
            }
            if flap_per_mille > 0 && self.rng.next() % 1000 < flap_per_mille {
                let paths: Vec<(String, String)> = self.paths.keys().cloned().collect();
                let (a, b) = paths[(self.rng.next() % paths.len() as u64) as usize].clone();
                let up = self.paths[&(a.clone(), b.clone())];
                self.set_link(&a, &b, !up);
                moved = true;
            }
            moved |= self.deliver_one();
            if std::env::var("RILL_STEP_CHECK").is_ok() {
                self.check_order(step);
            }
            if !moved && !self.time_jump() {
                return;
            }
        }
    }

    /// When nothing moves, lets enough time pass for waiting candidate links to expire.
    fn time_jump(&mut self) -> bool {
        if !self.time_jumps {
            return false;
        }
        self.now_ms += crate::link::CANDIDATE_HELLO_MS;
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        let mut moved = false;
        for n in &names {
            let now = self.now_ms;
            self.node(n).rep.handle_timeout(now);
            moved |= self.drain(n);
        }
        moved
    }

    /// Marks a connection dead without telling either end, as a crashed peer or a
    /// silent path leaves it until an idle timeout; what it carried is gone.
    fn kill_silently(&mut self, id: LinkId) {
        self.conns.get_mut(&id).unwrap().open = false;
        self.wire.retain(|(l, _), _| *l != id);
    }

    /// One end learns of a connection: for tests that order the two ends' views.
    fn open_half(&mut self, node: &str, peer: &str, id: LinkId, dialed_by_us: bool) {
        let now = self.now_ms;
        self.node(node).rep.handle_link_opened(now, &nn(peer), id, dialed_by_us);
    }

    fn new_conn(&mut self, dialer: &str, acceptor: &str) -> LinkId {
        self.next_link += 1;
        let id = LinkId(self.next_link);
        self.conns.insert(id, Conn { dialer: dialer.into(), acceptor: acceptor.into(), open: true });
        id
    }

    fn log_len(&self, node: &str, t: &str) -> usize {
        self.nodes[node].logs.get(&topic(t)).map_or(0, Vec::len)
    }

    fn cursor(&self, node: &str, peer: &str) -> u64 {
        let lanes = self.nodes[node].rep.lanes();
        lanes.iter().find(|(p, _, _)| p == peer).map_or(0, |(_, _, s)| s.cursor)
    }

    fn heal(&mut self) {
        let paths: Vec<(String, String)> = self.paths.keys().cloned().collect();
        for (a, b) in paths {
            if self.open_conns(&a, &b).is_empty() {
                self.paths.insert((a.clone(), b.clone()), false);
            }
            self.set_link(&a, &b, true);
        }
        self.run(0);
    }

    /// Invariant 3 on every node: messages of one (origin, producer) keep their order.
    /// `RILL_STEP_CHECK=1` runs it after every step, to find where a violation starts.
    fn check_order(&self, step: usize) {
        for (name, node) in &self.nodes {
            for (t, log) in &node.logs {
                let mut last: BTreeMap<(String, String), u64> = BTreeMap::new();
                for m in log {
                    let k = (m.message.origin.to_string(), m.message.id.producer.to_string());
                    if let Some(&prev) = last.get(&k) {
                        assert!(
                            m.message.id.seq > prev,
                            "step {step}: {name}/{t}: {} after seq {prev}; links {:?}",
                            m.message.id,
                            self.paths
                        );
                    }
                    last.insert(k, m.message.id.seq);
                }
            }
        }
    }

    /// Invariants 1-3: every produced message is on every node once, and messages of one
    /// (origin, producer) keep their order.
    fn check(&self) {
        for (name, node) in &self.nodes {
            for (origin, t, id) in &self.produced {
                let log = node.logs.get(t).map(Vec::as_slice).unwrap_or_default();
                let copies = log.iter().filter(|m| m.message.id == *id).count();
                assert_eq!(copies, 1, "{name} holds {id} (from {origin}) {copies} times");
            }
        }
        self.check_order(usize::MAX);
    }
}

#[test]
fn two_nodes_catch_up_in_order_and_exactly_once() {
    let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 1);
    mesh.produce("a", "t/ns/x", "p", 0..50);
    mesh.produce("b", "t/ns/x", "q", 0..30);
    mesh.heal();
    mesh.check();
    assert_eq!(mesh.node("b").logs[&topic("t/ns/x")].len(), 80);
    assert!(mesh.nodes.values().all(|n| n.rep.lanes().iter().all(|(_, _, s)| s.lag_messages == 0)));
}

#[test]
fn an_edge_reaches_a_region_it_has_no_link_to_through_a_relay() {
    // edge - r1 - r2: the edge has one uplink; r1 relays both ways.
    let mut mesh = Mesh::new(&["edge", "r1", "r2"], &[("edge", "r1"), ("r1", "r2")], 2);
    mesh.produce("edge", "t/ns/x", "sensor", 0..40);
    mesh.produce("r2", "t/ns/x", "model", 0..10);
    mesh.heal();
    mesh.check();
    assert_eq!(mesh.node("r2").logs[&topic("t/ns/x")].len(), 50);
    assert_eq!(mesh.node("edge").logs[&topic("t/ns/x")].len(), 50);
}

#[test]
fn a_full_mesh_with_two_paths_keeps_order_under_random_delivery_and_flapping_links() {
    // RILL_CORE_SEEDS=N sweeps more seeds (a soak); 40 keep the unit tests quick.
    let seeds: u64 = std::env::var("RILL_CORE_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(40);
    for seed in 1..seeds {
        let names = ["e1", "e2", "r1", "r2", "r3"];
        let links = [("e1", "r1"), ("e1", "r2"), ("e2", "r2"), ("r1", "r2"), ("r2", "r3"), ("r1", "r3")];
        let mut mesh = Mesh::new(&names, &links, seed);
        mesh.heal();
        for round in 0..4u64 {
            for (i, n) in names.iter().enumerate() {
                let start = round * 20;
                mesh.produce(n, "t/ns/x", &format!("p{i}"), start..start + 20);
                mesh.produce(n, "t/ns/y", &format!("p{i}"), start..start + 5);
            }
            mesh.run(30);
        }
        mesh.heal();
        mesh.check();
        for n in names {
            assert_eq!(mesh.node(n).logs[&topic("t/ns/x")].len(), 400, "seed {seed} node {n}");
        }
    }
}

#[test]
fn in_a_full_mesh_each_message_crosses_each_link_once() {
    let mut mesh = Mesh::new(&["r1", "r2", "r3"], &[("r1", "r2"), ("r2", "r3"), ("r1", "r3")], 8);
    mesh.heal();
    for (i, n) in ["r1", "r2", "r3"].iter().enumerate() {
        mesh.produce(n, "t/ns/x", &format!("p{i}"), 0..100);
    }
    mesh.run(0);
    mesh.check();
    // 300 messages, each to the two other regions, no relayed copies.
    assert_eq!(mesh.batch_messages_sent, 600);
}

#[test]
fn replacing_a_link_does_not_make_relays_resend() {
    let mut mesh = Mesh::new(&["r1", "r2", "r3"], &[("r1", "r2"), ("r2", "r3"), ("r1", "r3")], 10);
    mesh.heal();
    mesh.produce("r1", "t/ns/x", "p", 0..50);
    mesh.run(0);
    mesh.dial("r1", "r2");
    // r2 still knows r1 delivers to r3 itself: its lane to r3 must not rewind.
    let lanes = mesh.node("r2").rep.lanes();
    let to_r3 = lanes.iter().find(|(p, _, _)| p == "r3").expect("lane to r3").2;
    assert_eq!(to_r3.cursor, 50, "{lanes:?}");
    mesh.run(0);
    mesh.produce("r1", "t/ns/x", "p", 50..100);
    mesh.run(0);
    mesh.check();
    assert_eq!(mesh.batch_messages_sent, 200, "each message to each other region once, nothing relayed");
}

#[test]
fn a_region_whose_link_to_the_origin_is_down_gets_its_messages_through_a_relay() {
    // The edge is dual-homed; its link to r2 goes down and stays down.
    let mut mesh = Mesh::new(&["edge", "r1", "r2"], &[("edge", "r1"), ("edge", "r2"), ("r1", "r2")], 9);
    mesh.heal();
    mesh.produce("edge", "t/ns/x", "sensor", 0..30);
    mesh.run(0);
    mesh.set_link("edge", "r2", false);
    mesh.produce("edge", "t/ns/x", "sensor", 30..60);
    mesh.run(0);
    assert_eq!(mesh.node("r2").logs[&topic("t/ns/x")].len(), 60, "r1 relays while the direct link is down");
    mesh.heal();
    mesh.check();
}

#[test]
fn store_and_forward_ships_only_what_the_peer_lacks() {
    let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 3);
    mesh.heal();
    mesh.produce("a", "t/ns/x", "p", 0..10);
    mesh.run(0);
    mesh.set_link("a", "b", false);
    mesh.produce("a", "t/ns/x", "p", 10..25); // uplink down: accepted locally
    assert_eq!(mesh.node("b").logs[&topic("t/ns/x")].len(), 10);
    mesh.heal();
    mesh.check();
    assert_eq!(mesh.node("b").logs[&topic("t/ns/x")].len(), 25);
    assert_eq!(mesh.node("a").cursors[&("b".to_string(), topic("t/ns/x"))], 25);
}

#[test]
fn a_restarted_replicator_resumes_from_its_cursor_and_the_peer_summary() {
    let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 4);
    mesh.heal();
    mesh.produce("a", "t/ns/x", "p", 0..30);
    mesh.run(0);
    // Restart a: a fresh core with the saved config and cursor, no memory of holds.
    mesh.set_link("a", "b", false);
    let config = mesh.node("a").rep.config().clone();
    let cursor = mesh.node("a").cursors[&("b".to_string(), topic("t/ns/x"))];
    let node = mesh.node("a");
    node.rep = Replicator::new(nn("a"), 77, Settings::default(), config, Arc::new(SignedOk));
    node.rep.add_peer(nn("b"));
    node.rep.restore_cursor(&nn("b"), &topic("t/ns/x"), cursor);
    node.rep.handle_log_grew(&topic("t/ns/x"), 30);
    mesh.produce("a", "t/ns/x", "p", 30..35);
    mesh.heal();
    mesh.check();
    assert_eq!(mesh.node("b").logs[&topic("t/ns/x")].len(), 35);
}

#[test]
fn namespaces_outside_the_clusters_stay_home_until_added() {
    let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 5);
    mesh.node("a").rep.edit_config(&ns("t/private"), Edit::Create, 10).unwrap();
    let only_a: BTreeSet<NodeName> = [nn("a")].into();
    mesh.node("a").rep.edit_config(&ns("t/private"), Edit::SetClusters(only_a), 11).unwrap();
    mesh.produce("a", "t/private/x", "p", 0..5);
    mesh.heal();
    assert!(!mesh.node("b").logs.contains_key(&topic("t/private/x")));
    let both: BTreeSet<NodeName> = [nn("a"), nn("b")].into();
    mesh.node("b").rep.edit_config(&ns("t/private"), Edit::SetClusters(both), 12).unwrap();
    mesh.run(0);
    assert_eq!(mesh.node("b").logs[&topic("t/private/x")].len(), 5);
    assert_eq!(mesh.nodes["a"].rep.config(), mesh.nodes["b"].rep.config());
}

#[test]
fn config_edits_during_a_partition_converge_after_heal() {
    let mut mesh = Mesh::new(&["a", "b", "c"], &[("a", "b"), ("b", "c")], 6);
    mesh.heal();
    mesh.set_link("a", "b", false);
    let ab: BTreeSet<NodeName> = [nn("a"), nn("b")].into();
    let bc: BTreeSet<NodeName> = [nn("b"), nn("c")].into();
    mesh.node("a").rep.edit_config(&ns("t/ns"), Edit::SetClusters(ab), 100).unwrap();
    mesh.node("c").rep.edit_config(&ns("t/ns"), Edit::SetClusters(bc.clone()), 200).unwrap();
    mesh.node("a").rep.edit_config(&ns("t/ns"), Edit::RetentionAge(Some(60)), 300).unwrap();
    mesh.run(0);
    mesh.heal();
    let config = mesh.node("a").rep.config().clone();
    assert!(mesh.nodes.values().all(|n| *n.rep.config() == config), "all nodes converge");
    let p = config.get("t/ns").unwrap();
    assert_eq!(p.clusters.val, bc, "the later edit wins");
    assert_eq!(p.retention_age_s.val, Some(60));
}

/// Two linked nodes, with a's first batches of 20 messages sent to b and not yet
/// delivered; returns the link they are on.
fn batches_in_flight(seed: u64) -> (Mesh, LinkId) {
    let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], seed);
    mesh.heal();
    let link = mesh.open_conns("a", "b")[0];
    mesh.produce("a", "t/ns/x", "p", 0..20);
    mesh.drain("a");
    (mesh, link)
}

#[test]
fn a_new_link_reported_before_the_old_ones_close_resends_what_the_old_one_lost() {
    // Seed 252 of the simulation: a connection died with batches in flight, and the
    // redial's link was reported before the old one's close. Without a restart of the
    // lanes the batches in flight were never resent and the lane stalled at its limit.
    let (mut mesh, old) = batches_in_flight(11);
    mesh.kill_silently(old);
    let new = mesh.dial("a", "b");
    mesh.run(0);
    mesh.check();
    assert_eq!(mesh.log_len("b", "t/ns/x"), 20);
    assert_eq!(mesh.nodes["a"].rep.link(&nn("b")), Some(new));
    assert_eq!(mesh.nodes["a"].rep.link_stats(&nn("b")).replacements, 1);
}

#[test]
fn when_both_ends_dial_at_once_both_keep_the_link_the_smaller_name_dialed() {
    for a_sees_its_own_first in [true, false] {
        let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 12);
        mesh.paths.insert(key("a", "b"), true);
        mesh.produce("a", "t/ns/x", "p", 0..30);
        mesh.produce("b", "t/ns/x", "q", 0..30);
        let (by_a, by_b) = (mesh.new_conn("a", "b"), mesh.new_conn("b", "a"));
        mesh.open_half("b", "a", by_b, true);
        if a_sees_its_own_first {
            mesh.open_half("a", "b", by_a, true);
            mesh.open_half("a", "b", by_b, false);
        } else {
            mesh.open_half("a", "b", by_b, false);
            mesh.open_half("a", "b", by_a, true);
        }
        mesh.open_half("b", "a", by_a, false);
        // Data flows at once, on a link both ends agree on.
        mesh.time_jumps = false;
        mesh.run(0);
        mesh.check();
        assert_eq!(mesh.log_len("a", "t/ns/x"), 60);
        let kept = mesh.nodes["a"].rep.link(&nn("b"));
        assert!(
            kept.is_some() && kept == mesh.nodes["b"].rep.link(&nn("a")),
            "a_sees_its_own_first={a_sees_its_own_first}"
        );
        // When the Hellos cross, the smaller name's dial wins; when both ends saw b's
        // dial first, both keep it and the other link waits for a Hello in vain.
        let expected = if a_sees_its_own_first { by_a } else { by_b };
        assert_eq!(kept, Some(expected));
        mesh.time_jumps = true;
        mesh.run(0);
        assert_eq!(mesh.open_conns("a", "b"), vec![expected], "a_sees_its_own_first={a_sees_its_own_first}");
    }
}

#[test]
fn acks_that_arrive_on_a_replaced_link_move_no_cursor() {
    let (mut mesh, old) = batches_in_flight(13);
    while mesh.wire.get(&(old, "a".to_string())).is_some_and(|q| !q.is_empty()) {
        let m = mesh.wire.get_mut(&(old, "a".to_string())).unwrap().pop_front().unwrap();
        mesh.node("b").rep.handle_message(0, &nn("a"), old, m);
    }
    mesh.drain("b");
    let stale: Vec<PeerMessage> = mesh.wire.remove(&(old, "b".to_string())).unwrap_or_default().into();
    assert!(stale.iter().any(|m| matches!(m, PeerMessage::Ack { .. })));
    let new = mesh.dial("a", "b");
    mesh.drain("a");
    for m in stale {
        mesh.node("a").rep.handle_message(0, &nn("b"), old, m);
    }
    assert_eq!(mesh.cursor("a", "b"), 0, "acks of the old link moved the cursor");
    assert_eq!(mesh.nodes["a"].rep.current_link(&nn("b")), Some(new));
    mesh.run(0);
    mesh.check();
}

#[test]
fn a_peer_that_restarts_within_the_idle_timeout_carries_data_at_its_first_hello() {
    // a < b: a dialed the link, and its dial wins ties. b restarts and dials while a
    // still holds the dead link: b's new boot tells a that its link is dead.
    let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 14);
    mesh.heal();
    let old = mesh.open_conns("a", "b")[0];
    mesh.produce("a", "t/ns/x", "p", 0..10);
    mesh.run(0);
    mesh.kill_silently(old);
    let config = mesh.nodes["b"].rep.config().clone();
    let b = mesh.node("b");
    b.rep = Replicator::new(nn("b"), 4242, settings(), config, Arc::new(SignedOk));
    b.rep.add_peer(nn("a"));
    b.rep.handle_log_grew(&topic("t/ns/x"), 10);
    mesh.produce("a", "t/ns/x", "p", 10..20);
    let new = mesh.dial("b", "a");
    mesh.time_jumps = false; // no wait for the dead link to time out
    mesh.run(0);
    mesh.check();
    assert_eq!(mesh.log_len("b", "t/ns/x"), 20);
    assert_eq!(mesh.nodes["a"].rep.link(&nn("b")), Some(new));
    let stats = mesh.nodes["a"].rep.link_stats(&nn("b"));
    assert_eq!((stats.replacements, stats.refusals), (1, 0), "{stats:?}");
}

#[test]
fn failing_appends_and_replaced_links_lose_nothing_and_keep_order() {
    let seeds: u64 = std::env::var("RILL_CORE_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(40);
    for seed in 1..seeds {
        let names = ["e1", "r1", "r2", "r3"];
        let paths = [("e1", "r1"), ("e1", "r2"), ("r1", "r2"), ("r2", "r3"), ("r1", "r3")];
        let mut mesh = Mesh::new(&names, &paths, seed);
        mesh.heal();
        for round in 0..6u64 {
            for (i, n) in names.iter().enumerate() {
                mesh.produce(n, "t/ns/x", &format!("p{i}"), round * 10..round * 10 + 10);
            }
            for _ in 0..40 {
                let r = mesh.rng.next();
                let (a, b) = paths[(r % paths.len() as u64) as usize];
                match (r >> 8) % 4 {
                    // Either end redials (a replacement or a duplicate).
                    0 if mesh.paths[&key(a, b)] => drop(mesh.dial(b, a)),
                    1 if mesh.paths[&key(a, b)] => drop(mesh.dial(a, b)),
                    2 => {
                        let n = names[((r >> 16) % names.len() as u64) as usize];
                        let node = mesh.node(n);
                        node.disk_fails = !node.disk_fails;
                    }
                    _ => {}
                }
                for _ in 0..5 {
                    mesh.deliver_one();
                    for n in names {
                        mesh.drain(n);
                    }
                }
            }
        }
        for n in names {
            mesh.node(n).disk_fails = false;
        }
        mesh.heal();
        mesh.check();
        for n in names {
            assert_eq!(mesh.log_len(n, "t/ns/x"), 240, "seed {seed} node {n}");
        }
    }
}

#[test]
fn a_peer_that_acks_what_it_never_got_or_repeats_its_hello_loses_the_link_not_data() {
    let (mut mesh, link) = batches_in_flight(15);
    mesh.node("a").rep.handle_message(0, &nn("b"), link, PeerMessage::Ack { topic: topic("t/ns/x"), batch: 99 });
    mesh.drain("a");
    assert_eq!(mesh.cursor("a", "b"), 0);
    assert!(matches!(mesh.closed.last(), Some((n, l, CloseReason::Violation(_))) if n == "a" && *l == link));
    mesh.heal();
    let link = mesh.open_conns("a", "b")[0];
    let hello = mesh.nodes["b"].rep.hello(Vec::new());
    mesh.node("a").rep.handle_message(0, &nn("b"), link, hello);
    mesh.drain("a");
    assert!(matches!(mesh.closed.last(), Some((_, l, CloseReason::Violation(w))) if *l == link && w.contains("Hello")));
    mesh.heal();
    mesh.check();
    assert_eq!(mesh.log_len("b", "t/ns/x"), 20);
}

#[test]
fn the_checker_catches_a_replicator_that_ignores_what_the_peer_holds() {
    // Guard against a checker that cannot fail: duplicate a message by hand.
    let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 7);
    mesh.produce("a", "t/ns/x", "p", 0..3);
    mesh.heal();
    let t = topic("t/ns/x");
    let dup = mesh.node("b").logs[&t][0].clone();
    mesh.node("b").logs.get_mut(&t).unwrap().push(dup);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mesh.check()));
    assert!(caught.is_err());
}

fn signed_grant(incarnation: u64, principal: &str, signature: &[u8]) -> crate::access::Signed {
    use crate::access::{Action, Body, Entry, Grant, Incarnation, Resource, Signer};
    let grant = Grant { principal: principal.into(), action: Action::Produce, resource: Resource::parse("t").unwrap() };
    crate::access::Signed {
        body: Body::Create { incarnation: Incarnation(incarnation), entry: Entry::Grant(grant) },
        by: Signer { principal: "root".into(), superuser: true },
        at_ms: 1,
        cert: Vec::new(),
        signature: signature.to_vec(),
    }
}

#[test]
fn grants_made_apart_converge_and_a_forged_one_is_refused_and_goes_no_further() {
    let mut mesh = Mesh::new(&["a", "b", "c"], &[("a", "b"), ("b", "c")], 6);
    mesh.heal();
    mesh.set_link("a", "b", false);
    mesh.node("a").rep.apply_signed(signed_grant(1, "alice", b"ok")).unwrap();
    mesh.node("c").rep.apply_signed(signed_grant(2, "bob", b"ok")).unwrap();
    // A forged grant does not even enter through the node's own door.
    assert!(mesh.node("c").rep.apply_signed(signed_grant(3, "mallory", b"forged")).is_err());
    mesh.run(0);
    mesh.heal();
    let config = mesh.node("a").rep.config().clone();
    assert!(mesh.nodes.values().all(|n| *n.rep.config() == config), "all nodes converge");
    let access = crate::access::Access::of(config.records());
    assert!(access.holds_any("alice") && access.holds_any("bob"));
    // A peer (b, say with a stolen node key) sends c a grant nobody signed.
    #[derive(Debug)]
    struct AcceptAll;
    impl crate::access::Verify for AcceptAll {
        fn verify(&self, _: &crate::access::Signed) -> Result<(), String> {
            Ok(())
        }
    }
    let mut forged = ConfigDoc::default();
    forged.apply_signed(signed_grant(4, "mallory", b"forged"), &AcceptAll).unwrap();
    let c = mesh.node("c");
    c.rep.handle_message(0, &nn("b"), LinkId(0), PeerMessage::Config(forged));
    assert_eq!(c.rep.refused_entries(), 1);
    let actions: Vec<Action> = std::iter::from_fn(|| c.rep.poll_action()).collect();
    assert!(actions.iter().any(|a| matches!(a, Action::EntryRefused { why, .. } if why.contains("bad signature"))));
    assert!(!actions.iter().any(|a| matches!(a, Action::Send { .. } | Action::SaveConfig)), "{actions:?}");
    assert!(!crate::access::Access::of(c.rep.config().records()).holds_any("mallory"));
}

/// A function in namespace `t/ns` whose module is `module`, signed by a superuser.
fn signed_function(incarnation: u64, module: &[u8]) -> crate::access::Signed {
    use crate::{
        access::{Body, Entry, Incarnation, Signer},
        function::{FunctionDef, Start},
    };
    let def = FunctionDef {
        name: "t/ns/f".into(),
        module: rill_storage::blobs::hash(module),
        inputs: vec!["t/ns/in".into()],
        outputs: vec!["t/ns/out".into()],
        nodes: None,
        start: Start::Earliest,
        params: Vec::new(),
        paused: false,
    };
    crate::access::Signed {
        body: Body::Create { incarnation: Incarnation(incarnation), entry: Entry::Function(def) },
        by: Signer { principal: "root".into(), superuser: true },
        at_ms: 1,
        cert: Vec::new(),
        signature: b"ok".to_vec(),
    }
}

/// A module of `len` bytes that is not all one value.
fn module_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn a_module_reaches_every_node_of_its_namespace_in_chunks_through_a_relay_and_flapping_links() {
    let mut mesh = Mesh::new(&["a", "b", "c"], &[("a", "b"), ("b", "c")], 11);
    mesh.heal();
    // Past one window of chunks, and not a whole number of chunks.
    let module = module_bytes(5 * BLOB_CHUNK_BYTES as usize + 123);
    let hash = rill_storage::blobs::hash(&module);
    let a = mesh.node("a");
    a.blobs.insert(hash, module.clone());
    a.rep.handle_blob_stored(hash);
    a.rep.apply_signed(signed_function(1, &module)).unwrap();
    mesh.run(5);
    mesh.heal();
    for n in ["a", "b", "c"] {
        assert_eq!(mesh.nodes[n].blobs.get(&hash), Some(&module), "{n} holds the module whole");
        assert!(mesh.nodes[n].rep.missing_blobs().is_empty(), "{n}");
    }
}

#[test]
fn a_node_outside_the_functions_namespaces_neither_fetches_nor_is_sent_its_module() {
    let mut mesh = Mesh::new(&["a", "b", "c"], &[("a", "b"), ("a", "c")], 12);
    let two: BTreeSet<NodeName> = [nn("a"), nn("b")].into();
    mesh.node("a").rep.edit_config(&ns("t/ns"), Edit::SetClusters(two), 3).unwrap();
    mesh.heal();
    let module = module_bytes(1000);
    let hash = rill_storage::blobs::hash(&module);
    let a = mesh.node("a");
    a.blobs.insert(hash, module.clone());
    a.rep.handle_blob_stored(hash);
    a.rep.apply_signed(signed_function(1, &module)).unwrap();
    mesh.heal();
    assert!(mesh.nodes["b"].blobs.contains_key(&hash));
    assert!(!mesh.nodes["c"].blobs.contains_key(&hash), "c is not in t/ns's clusters");
    // c asks anyway (a misbehaving node): a refuses.
    let link = mesh.open_conns("a", "c")[0];
    let a = mesh.node("a");
    a.rep.handle_message(0, &nn("c"), link, PeerMessage::BlobWant { hash, offset: 0, len: 1000 });
    let actions: Vec<Action> = std::iter::from_fn(|| a.rep.poll_action()).collect();
    let missing = PeerMessage::BlobMissing { hash };
    assert_eq!(actions, vec![Action::Send { peer: nn("c"), link, message: missing }]);
}

#[test]
fn a_module_damaged_on_one_peer_is_refused_whole_and_fetched_from_another() {
    let mut mesh = Mesh::new(&["a", "b", "c"], &[("a", "c"), ("b", "c")], 13);
    mesh.heal();
    let module = module_bytes(3000);
    let hash = rill_storage::blobs::hash(&module);
    let mut damaged = module.clone();
    damaged[1500] ^= 1;
    // a ("first by name", so c asks it first) holds a damaged copy; b a whole one.
    for (n, bytes) in [("a", &damaged), ("b", &module)] {
        let node = mesh.node(n);
        node.blobs.insert(hash, bytes.clone());
        node.rep.handle_blob_stored(hash);
    }
    mesh.node("b").rep.apply_signed(signed_function(1, &module)).unwrap();
    mesh.heal();
    assert_eq!(mesh.nodes["c"].blobs.get(&hash), Some(&module));
    assert_eq!(mesh.nodes["c"].rep.refused_blobs(), 1, "a's damaged copy was refused");
}

#[test]
fn a_fetch_whose_link_drops_mid_blob_starts_again_and_ends_whole() {
    let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 14);
    mesh.heal();
    let module = module_bytes(9 * BLOB_CHUNK_BYTES as usize);
    let hash = rill_storage::blobs::hash(&module);
    let a = mesh.node("a");
    a.blobs.insert(hash, module.clone());
    a.rep.handle_blob_stored(hash);
    a.rep.apply_signed(signed_function(1, &module)).unwrap();
    // Deliver until b has some chunks but not all, then cut the link.
    for _ in 0..10_000 {
        mesh.now_ms += 1;
        for n in ["a", "b"] {
            mesh.drain(n);
        }
        mesh.deliver_one();
        let b = &mesh.nodes["b"].rep;
        if b.blobs.fetches.get(&hash).is_some_and(|f| f.bytes.len() > BLOB_CHUNK_BYTES as usize) {
            break;
        }
    }
    assert!(mesh.nodes["b"].rep.blobs.fetches.contains_key(&hash), "the fetch was under way");
    mesh.set_link("a", "b", false);
    mesh.heal();
    assert_eq!(mesh.nodes["b"].blobs.get(&hash), Some(&module));
}
