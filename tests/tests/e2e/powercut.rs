//! Power cuts on the real stack (issue 14): real nodes with their data dirs on powerfs
//! mounts, which forget every write and directory entry not yet synced. Each cut turns a
//! node's disk off at a moment when something written is not yet synced, kills the node,
//! drops the unsynced layer (unmounting, so the kernel's page cache goes too), mounts again
//! and restarts the node, under producers with caller-chosen seqs, a consumer, and a
//! topic created just before each cut. Afterwards: nothing acknowledged is missing or
//! stored twice on any node, the subscription never resumed past its consumer's acks, the
//! catalogue survived every restart, a resend is deduplicated, and the topics created
//! before the cuts are there.
//!
//! Needs root and /dev/fuse (as the test runner is); `RILL_SKIP_POWERFS=1` skips it, and
//! says so, where they are missing.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rill_node::{
    client::{Client, ClientOptions, Outgoing},
    protocol::{Produced, StartPosition},
};
use rill_powerfs::Mounted;
use rill_replication::namespace::Edit;
use tokio::time::Instant;

use crate::{
    mesh::{MeshDir, TOPIC, create_namespace},
    support::{TestNode, options},
};

/// Each file sync takes this long, as on a disk.
const SYNC_DELAY: Duration = Duration::from_millis(2);
/// Messages per produce batch.
const BATCH: u64 = 20;

fn skipped() -> bool {
    let skip = std::env::var_os("RILL_SKIP_POWERFS").is_some_and(|v| v == "1");
    if skip {
        eprintln!("RILL_SKIP_POWERFS=1: the power-cut test is skipped");
    }
    skip
}

/// One node on its own powerfs mount.
struct CutNode {
    node: TestNode,
    disk: Mounted,
}

/// What a run saw.
#[derive(Debug, Default)]
struct Figures {
    cuts: u64,
    acknowledged: u64,
    lost: u64,
    duplicated: u64,
    catalogues_lost: u64,
    topics_lost: u64,
    resumed_past_acks: u64,
    entries_undone: u64,
    bytes_dropped: Vec<u64>,
}

/// What the producers were told: payload per (producer, seq).
type Acked = Arc<Mutex<BTreeMap<(String, u64), String>>>;

/// A producer with caller-chosen seqs writing batches through `addr` until `stop`,
/// resending a batch with the same seqs after every failure.
async fn produce(name: String, options: ClientOptions, acked: Acked, stop: Arc<AtomicBool>) -> u64 {
    let mut next = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), Client::connect(&options)).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(mut p) = client.producer_with_seqs(TOPIC, name.clone()).await else { continue };
        while !stop.load(Ordering::Relaxed) {
            let payload = |seq: u64| format!("{name} {seq}");
            let batch = (next..next + BATCH).map(|s| Outgoing::payload(payload(s)).with_seq(s)).collect();
            if p.send(batch).await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(5), p.flush()).await {
                Ok(Ok(acks)) => {
                    let mut a = acked.lock().expect("acked");
                    for ack in acks {
                        a.extend(ack.seqs.iter().map(|&s| ((name.clone(), s), payload(s))));
                    }
                    next += BATCH;
                }
                _ => break,
            }
        }
    }
    next
}

/// A consumer acking every message on `options`' node; counts the times a subscription
/// resumed after the position its consumer had acknowledged.
async fn consume(options: ClientOptions, stop: Arc<AtomicBool>) -> u64 {
    let (mut acked_through, mut skips) = (None::<u64>, 0);
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), Client::connect(&options)).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(mut consumer) = client.subscribe(TOPIC, "feed", StartPosition::Earliest).await else { continue };
        let mut first = true;
        while let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
            if first && acked_through.is_some_and(|a| m.offset > a + 1) {
                skips += 1;
            }
            first = false;
            consumer.ack(m.offset);
            acked_through = Some(acked_through.map_or(m.offset, |a| a.max(m.offset)));
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
    }
    skips
}

/// Readers made so far: each read uses a subscription of its own, from the start.
static READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Payload per id of everything `node` holds of `topic`, and how many ids it holds twice.
async fn holdings(node: &TestNode, topic: &str) -> (BTreeMap<(String, u64), String>, u64) {
    let client = node.client().await;
    let stats = client.stats().await.expect("stats");
    let end = stats.topics.iter().find(|t| t.topic == topic).map_or(0, |t| t.end_offset);
    let (mut held, mut twice) = (BTreeMap::new(), 0);
    if end == 0 {
        return (held, 0);
    }
    // A new subscription each time: one that read (and acked) before would continue after
    // what it read, and a read during catch-up would then never see the start again.
    let reader = format!("powercut-check-{}", READS.fetch_add(1, Ordering::Relaxed));
    let mut consumer = client.subscribe(topic, &reader, StartPosition::Earliest).await.expect("subscribe");
    while let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
        let id = (m.message.id.producer.as_str().to_string(), m.message.id.seq);
        if held.insert(id, String::from_utf8_lossy(&m.message.payload).into_owned()).is_some() {
            twice += 1;
        }
        consumer.ack(m.offset);
        if m.offset + 1 >= end {
            break;
        }
    }
    (held, twice)
}

/// Runs `cuts` power cuts over a mesh of `ips.len()` nodes (each on its own mount).
async fn run(label: &str, ips: &[&str], cuts: u64, skip_syncs: bool) -> Figures {
    let names: Vec<String> = (0..ips.len()).map(|i| format!("{label}{i}")).collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(String::as_str).zip(ips.iter().copied()).collect();
    let mesh = MeshDir::on(&pairs);
    for (i, name) in names.iter().enumerate() {
        let dials: Vec<&str> = names[i + 1..].iter().map(String::as_str).collect();
        let dialed_by: Vec<&str> = names[..i].iter().map(String::as_str).collect();
        mesh.configure(name, &dials, &dialed_by);
    }
    let envs: &[(&str, &str)] = if skip_syncs { &[("RILL_E2E_SKIP_FDATASYNC", "1")] } else { &[] };
    let mut nodes: Vec<CutNode> = names
        .iter()
        .map(|name| {
            let dir = mesh.node_dir(name);
            let mnt = dir.join("mnt");
            std::fs::create_dir_all(&mnt).expect("mountpoint");
            let disk = Mounted::mount(&mnt, SYNC_DELAY).unwrap_or_else(|e| {
                panic!("the power-cut test needs root and /dev/fuse (set RILL_SKIP_POWERFS=1 to skip it): {e}")
            });
            // Below the mount's root, as a real data dir sits in some parent directory.
            let data: PathBuf = mnt.join("disk/rill-data");
            let extra = ["--config", "node.toml", "--data-dir", data.to_str().expect("utf-8")];
            let mut node = TestNode::start_at_with_env(&dir, name, mesh.addrs[name], &extra, envs)
                .unwrap_or_else(|e| panic!("{name} did not start: {e}"));
            node.certs = mesh.certs();
            CutNode { node, disk }
        })
        .collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    create_namespace(&nodes[0].node, &all).await;
    let policy = Edit::RetentionAge(Some(86_400));
    nodes[0].node.client().await.ns_edit("acme/sensors", policy).await.expect("policy");

    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.node.addr).collect();
    let mut producers = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        for k in 0..2 {
            let o = options(*addr, &mesh.certs());
            producers.push(tokio::spawn(produce(format!("n{i}-p{k}"), o, Arc::clone(&acked), Arc::clone(&stop))));
        }
    }
    let consumer = tokio::spawn(consume(options(addrs[0], &mesh.certs()), Arc::clone(&stop)));

    let mut figures = Figures::default();
    let mut cut_topics = Vec::new();
    for cut in 0..cuts {
        tokio::time::sleep(Duration::from_millis(400 + (cut * 137) % 500)).await;
        let victim = (cut as usize) % nodes.len();
        let n = &mut nodes[victim];
        // A topic created just before the cut: it must survive if its message was acked.
        let topic = format!("acme/sensors/cut-{cut}");
        let client = n.node.client().await;
        let mut p = client.producer_with_seqs(&topic, "creator".into()).await.expect("producer");
        p.send(vec![Outgoing::payload("created").with_seq(1)]).await.expect("send");
        if p.flush().await.is_ok() {
            cut_topics.push((victim, topic));
        }
        let caught_unsynced = n.disk.power_off_while_unsynced(Duration::from_secs(2));
        n.node.kill9();
        let report = n.disk.cut().expect("cut");
        let dropped = report.bytes_dropped > 0 || report.entries_undone > 0;
        assert!(caught_unsynced && dropped, "cut {cut} dropped nothing ({report:?}): it proved nothing");
        figures.cuts += 1;
        figures.bytes_dropped.push(report.bytes_dropped);
        figures.entries_undone += report.entries_undone;
        n.node.start_again();
        let catalogue = n.node.client().await.ns_get().await.expect("ns get");
        let kept = catalogue.get("acme/sensors").is_some_and(|p| p.retention_age_s.val == Some(86_400));
        figures.catalogues_lost += u64::from(!kept);
    }
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.expect("producer");
    }
    figures.resumed_past_acks = consumer.await.expect("consumer");

    // Every node must come to hold everything acknowledged (or the deadline says it lost).
    let acked = acked.lock().expect("acked").clone();
    figures.acknowledged = acked.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(if skip_syncs { 10 } else { 60 });
    for n in &nodes {
        loop {
            let (held, twice) = holdings(&n.node, TOPIC).await;
            let missing = acked.iter().filter(|(id, payload)| held.get(*id) != Some(payload)).count() as u64;
            if missing == 0 || Instant::now() >= deadline {
                figures.lost = figures.lost.max(missing);
                figures.duplicated += twice;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for (victim, topic) in &cut_topics {
        let (held, _) = holdings(&nodes[*victim].node, topic).await;
        figures.topics_lost += u64::from(held.get(&("creator".to_string(), 1)).is_none_or(|p| p != "created"));
    }
    // A resend of each producer's last acknowledged batch stores nothing.
    if !skip_syncs {
        let last: BTreeMap<&String, u64> = acked.keys().fold(BTreeMap::new(), |mut m, (p, s)| {
            let e = m.entry(p).or_insert(0);
            *e = (*e).max(*s);
            m
        });
        let client = nodes[0].node.client().await;
        for (producer, &high) in &last {
            let mut p = client.producer_with_seqs(TOPIC, producer.to_string()).await.expect("producer");
            let first = high + 1 - BATCH;
            let batch = (first..=high).map(|s| Outgoing::payload(format!("{producer} {s}")).with_seq(s)).collect();
            p.send(batch).await.expect("send");
            for ack in p.flush().await.expect("acks") {
                let stored: BTreeSet<bool> = ack.results.iter().map(|r| matches!(r, Produced::Stored(_))).collect();
                assert_eq!(stored, BTreeSet::from([false]), "{producer}: a resend after the cuts was stored again");
            }
        }
    }
    eprintln!("power cuts {label}: {figures:?}");
    figures
}

fn assert_nothing_lost(f: &Figures) {
    assert!(f.acknowledged > 0, "nothing was acknowledged: {f:?}");
    assert_eq!(
        (f.lost, f.duplicated, f.catalogues_lost, f.topics_lost, f.resumed_past_acks),
        (0, 0, 0, 0, 0),
        "(lost, duplicated, catalogues lost, topics lost, resumed past acks): {f:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_loses_nothing_acknowledged_in_power_cuts() {
    if skipped() {
        return;
    }
    assert_nothing_lost(&run("pcs", &["127.0.0.7"], 8, false).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_mesh_loses_nothing_acknowledged_in_power_cuts() {
    if skipped() {
        return;
    }
    assert_nothing_lost(&run("pcm", &["127.0.0.8", "127.0.0.9", "127.0.0.10"], 8, false).await);
}

/// The check can fail: a node whose syncs do nothing loses acknowledged messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_power_cut_check_catches_a_node_that_skips_its_syncs() {
    if skipped() {
        return;
    }
    let f = run("pcx", &["127.0.0.11"], 4, true).await;
    assert!(f.lost > 0, "syncs skipped and nothing lost: the check is blind: {f:?}");
}

/// The evidence that replaced sled (issue 14, item 5): on powerfs, after sled has flushed
/// an entry (and 1.5 s later, past its 500 ms background flush), a cut would still undo
/// the directory entries of its whole store, and so the entry; after the metadata log
/// flushes, a cut would drop nothing. If sled ever leaves nothing unsynced, this says so.
/// (The cut itself cannot run under sled: it keeps its files open, and its threads panic
/// on the dead disk.)
#[test]
fn sled_leaves_a_flushed_entry_unsynced_and_the_metadata_log_does_not() {
    use rill_storage::{
        meta::{MetaStore, SledMeta},
        metalog::LogMeta,
    };
    if skipped() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mountpoint");
    let disk = Mounted::mount(&mnt, SYNC_DELAY).expect("mount powerfs (root and /dev/fuse)");
    let data = mnt.join("disk/rill-data");
    std::fs::create_dir_all(&data).expect("data dir");
    for d in [&mnt, &mnt.join("disk"), &data] {
        std::fs::File::open(d).and_then(|f| f.sync_all()).expect("sync dir");
    }
    let log = LogMeta::open(&data.join("meta.log")).expect("log");
    log.put("repl/catalogue", b"acknowledged").expect("put");
    log.flush().expect("flush");
    let after_log = disk.volume().unsynced();
    assert_eq!((after_log.bytes_dropped, after_log.entries_undone), (0, 0), "the metadata log left {after_log:?}");
    let sled = SledMeta::open(&data.join("meta")).expect("sled");
    sled.put("repl/catalogue", b"acknowledged").expect("put");
    sled.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(1500));
    let after_sled = disk.volume().unsynced();
    eprintln!("after sled's flush and 1.5 s, a cut would undo {after_sled:?}");
    assert!(after_sled.entries_undone > 0, "sled left {after_sled:?}: the reason it was replaced is gone");
    drop(sled);
}
