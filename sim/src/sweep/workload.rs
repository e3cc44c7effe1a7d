//! The sweep's clients, run on the mesh: producers that retry and fail over, the operator
//! that changes the clusters, the admin that creates a stream function, and a durable
//! subscriber.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
    time::Duration,
};

use rill_node::{
    client::{Client, ClientError, Outgoing, Producer},
    protocol::StartPosition,
};
use rill_replication::{
    access::{Body, Entry, Incarnation},
    function::{FunctionDef, Start},
    namespace::Edit,
};
use rill_storage::NodeName;

use super::{
    NAMESPACE, TOPIC,
    plan::{ClustersEdit, ProducerPlan},
};
use crate::{client::Ctx, clock::sim_now as now};

/// Batches per producer, their size, and the pause between them: production spans the
/// fault window.
const BATCHES: u64 = 20;
const BATCH: u64 = 10;
const BATCH_EVERY: Duration = Duration::from_secs(1);
/// A producer with a second node switches to it after failing this long.
const FAILOVER_AFTER: Duration = Duration::from_secs(1);
/// How long a client waits for a node to answer before counting it as down: short, so a
/// producer notices a dead node and fails over within about a second.
const CONNECT_WAIT: Duration = Duration::from_secs(1);
/// The pause between a client's attempts.
const RETRY_EVERY: Duration = Duration::from_millis(300);
/// A quiet subscription is dropped and opened again after this, so its end is checked.
const QUIET_FOR: Duration = Duration::from_secs(2);
/// The subscriber starts this late (the first producer creates the namespace meanwhile).
const SUBSCRIBE_AFTER: Duration = Duration::from_secs(1);
/// The subscriber stops this long after the checker read the nodes, seen everything or not.
const SUBSCRIBER_LINGER: Duration = Duration::from_secs(60);

/// A message as the checker identifies it: (origin, producer session, seq), where the
/// session is the producer name and its epoch ([`session`]).
pub(super) type Held = (String, String, u64);

/// A producer session as the checker names it: ids of two sessions never compare equal.
pub(super) fn session(producer: &str, epoch: u64) -> String {
    format!("{producer}@{epoch:x}")
}

/// What the clients record and the harness reads.
#[derive(Default)]
pub(super) struct Record {
    /// (producer session, seq) acknowledged, with the payload acknowledged under it.
    pub(super) acked: Mutex<BTreeMap<(String, u64), String>>,
    pub(super) failovers: Mutex<u64>,
    /// What the checker found on the subscriber's node, once it has read the nodes, and
    /// when it did.
    pub(super) collected: Mutex<Option<(Duration, Vec<Held>)>>,
    /// The subscriber's first deliveries, in order.
    pub(super) delivered: Mutex<(BTreeSet<Held>, Vec<Held>)>,
    /// The run has the stream function.
    pub(super) function_wanted: bool,
    /// The stream function was created (its definition is durable on a node).
    pub(super) function_created: Mutex<bool>,
}

/// The sweep's stream function: the example normaliser with its defaults, over the
/// topic into [`OUTPUT`], on the namespace's clusters (it names no nodes, so it moves
/// when the operator changes them). The sweep's payloads have no "t" field, so each
/// output carries its input's payload.
pub(super) const FUNCTION: &str = "acme/sensors/copy";
/// The function's output topic.
pub(super) const OUTPUT: &str = "acme/sensors/out";
/// The function's incarnation (fixed: a run draws nothing outside its seed).
pub(super) const FUNCTION_INCARNATION: u64 = 0x5eed;
const MODULE: &[u8] = include_bytes!("../../../functions/examples/scale.wasm");
/// The admin creates the function this late (the first producer creates the namespace
/// meanwhile).
const FUNCTION_AFTER: Duration = Duration::from_secs(2);

/// The producer name and rank of the input an output of the sweep's function derives
/// from (see `rill_node`'s derived ids), if `producer` is one of its outputs.
pub(super) fn output_of(producer: &str) -> Option<(&str, u32)> {
    let prefix = format!("$fn/copy.{FUNCTION_INCARNATION:016x}/0.");
    let rest = producer.strip_prefix(&prefix)?;
    let (rank, input) = rest.split_once('/')?;
    Some((input, rank.parse().ok()?))
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("harness lock")
}

/// A connection, if the node answers within [`CONNECT_WAIT`].
async fn connect(ctx: &Ctx, host: &str) -> Option<Client> {
    ctx.connect_within(host, CONNECT_WAIT).await.ok()
}

async fn connect_retrying(ctx: &Ctx, host: &str) -> Client {
    loop {
        if let Some(c) = connect(ctx, host).await {
            return c;
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// Where a producer writes, and its switch to the other node after failing for a while.
struct Route<'a> {
    plan: &'a ProducerPlan,
    at: String,
    failing_since: Option<Duration>,
}

impl Route<'_> {
    fn failed(&mut self, record: &Record) {
        let since = *self.failing_since.get_or_insert(now());
        let Some(other) = &self.plan.failover else { return };
        if now() - since >= FAILOVER_AFTER {
            self.at = if self.at == self.plan.home { other.clone() } else { self.plan.home.clone() };
            self.failing_since = Some(now());
            *lock(&record.failovers) += 1;
        }
    }

    async fn connect(&mut self, ctx: &Ctx, record: &Record) -> Client {
        loop {
            if let Some(c) = connect(ctx, &self.at).await {
                return c;
            }
            self.failed(record);
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }
}

/// A plan's node names (valid: the plan draws them).
fn node_names(names: &BTreeSet<String>) -> BTreeSet<NodeName> {
    names.iter().map(|n| NodeName::parse(n).expect("plans draw valid node names")).collect()
}

/// A new producer session as the plan's producer opens one: a new epoch, or epoch 0 with
/// its own seqs.
async fn open_producer(client: &Client, plan: &ProducerPlan) -> Result<Producer, ClientError> {
    if plan.chosen_seqs {
        client.producer_with_seqs(TOPIC, plan.name.clone()).await
    } else {
        client.producer(TOPIC, plan.name.clone()).await
    }
}

/// What one producer does.
pub(super) struct ProducerRun {
    pub(super) plan: ProducerPlan,
    /// The first producer creates the namespace, over these clusters.
    pub(super) creates_namespace: Option<BTreeSet<String>>,
    /// It stops retrying a batch after this (a node that never takes writes again shows
    /// up in the check).
    pub(super) give_up: Duration,
}

/// One producer: BATCHES batches, each retried until acknowledged, failing over between
/// its nodes if it has two.
pub(super) async fn produce(ctx: &Ctx, run: &ProducerRun, record: &Record) {
    let plan = &run.plan;
    let mut route = Route { plan, at: plan.home.clone(), failing_since: None };
    let mut client = route.connect(ctx, record).await;
    if let Some(clusters) = &run.creates_namespace {
        while client.ns_edit(NAMESPACE, Edit::Create).await.is_err()
            || client.ns_edit(NAMESPACE, Edit::SetClusters(node_names(clusters))).await.is_err()
        {
            client = connect_retrying(ctx, &plan.home).await;
        }
    }
    let mut p = loop {
        match open_producer(&client, plan).await {
            Ok(p) => break p,
            Err(_) => client = route.connect(ctx, record).await,
        }
    };
    for batch in 0..BATCHES {
        let payloads: Vec<String> = (0..BATCH).map(|i| format!("{}-{}", plan.name, batch * BATCH + i)).collect();
        let outgoing = || {
            let chosen = plan.chosen_seqs;
            payloads.iter().zip(batch * BATCH..).map(move |(pl, seq)| {
                let m = Outgoing::payload(pl.clone());
                if chosen { m.with_seq(seq) } else { m }
            })
        };
        let _ = p.send(outgoing().collect()).await;
        if plan.restarts && batch % 4 == 3 {
            // Restarted mid-batch without memory: a new session sends the batch again.
            if let Ok(restarted) = open_producer(&client, plan).await {
                p = restarted;
                let _ = p.send(outgoing().collect()).await;
            }
        }
        while now() < run.give_up {
            match p.flush().await {
                Ok(acks) => {
                    let mut acked = lock(&record.acked);
                    for a in acks {
                        for (&seq, payload) in a.seqs.iter().zip(&payloads) {
                            acked.insert((session(&plan.name, p.epoch()), seq), payload.clone());
                        }
                    }
                    route.failing_since = None;
                    break;
                }
                Err(_) => {
                    route.failed(record);
                    tokio::time::sleep(RETRY_EVERY).await;
                    client = route.connect(ctx, record).await;
                    if !plan.restarts {
                        let _ = p.resume(&client).await;
                    } else if let Ok(restarted) = open_producer(&client, plan).await {
                        p = restarted;
                        let _ = p.send(outgoing().collect()).await;
                    }
                }
            }
        }
        tokio::time::sleep(BATCH_EVERY).await;
    }
}

/// The admin: stores the function's module on `via` and creates its definition there,
/// retried until both are taken (or `give_up`).
pub(super) async fn create_function(ctx: &Ctx, via: &str, give_up: Duration, record: &Record) {
    let def = FunctionDef {
        name: FUNCTION.into(),
        module: rill_storage::blobs::hash(MODULE),
        inputs: vec![TOPIC.into()],
        outputs: vec![OUTPUT.into()],
        nodes: None,
        start: Start::Earliest,
        params: Vec::new(),
        paused: false,
    };
    tokio::time::sleep(FUNCTION_AFTER).await;
    while now() < give_up {
        if let Some(client) = connect(ctx, via).await {
            let body =
                Body::Create { incarnation: Incarnation(FUNCTION_INCARNATION), entry: Entry::Function(def.clone()) };
            let at_ms = crate::clock::EPOCH_S * 1000 + now().as_millis() as u64;
            if client.put_blob(NAMESPACE, MODULE.to_vec()).await.is_ok()
                && let Ok(signed) = client.sign(body, at_ms)
                && client.catalogue_edit(signed).await.is_ok()
            {
                *lock(&record.function_created) = true;
                return;
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// The operator: each clusters change at its time through its node, retried until taken.
pub(super) async fn operate(ctx: &Ctx, edits: &[ClustersEdit], give_up: Duration) {
    for edit in edits {
        tokio::time::sleep(edit.at.saturating_sub(now())).await;
        while now() < give_up {
            if let Some(client) = connect(ctx, &edit.via).await
                && client.ns_edit(NAMESPACE, Edit::SetClusters(node_names(&edit.clusters))).await.is_ok()
            {
                break;
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }
}

/// A durable subscription on one node, reading and acknowledging from the start of the
/// run, through its node's crashes, until it has seen everything the checker found there
/// (or a minute after the checker finished).
pub(super) async fn consume(ctx: &Ctx, node: &str, record: &Record) {
    let done = || {
        let collected = lock(&record.collected);
        let Some((at, held)) = collected.as_ref() else { return false };
        let seen = &lock(&record.delivered).0;
        held.iter().all(|m| seen.contains(m)) || now() > *at + SUBSCRIBER_LINGER
    };
    tokio::time::sleep(SUBSCRIBE_AFTER).await;
    while !done() {
        let subscribed = match connect(ctx, node).await {
            Some(client) => client.subscribe(TOPIC, "feed", StartPosition::Earliest).await.ok(),
            None => None,
        };
        let Some(mut consumer) = subscribed else {
            tokio::time::sleep(RETRY_EVERY).await;
            continue;
        };
        while let Ok(Ok(Some(m))) = tokio::time::timeout(QUIET_FOR, consumer.next()).await {
            let (origin, id) = (m.message.origin.to_string(), &m.message.id);
            let id = (origin, session(id.producer.as_str(), id.epoch), id.seq);
            let mut delivered = lock(&record.delivered);
            if delivered.0.insert(id.clone()) {
                delivered.1.push(id);
            }
            consumer.ack(m.offset);
        }
    }
}
