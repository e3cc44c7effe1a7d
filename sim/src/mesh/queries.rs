//! What the harness asks the nodes, through hidden clients that retry over the faults.
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    future::Future,
    rc::Rc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use rill_node::{
    client::{Client, ClientError},
    protocol::{NodeStats, SeekTarget, StartPosition},
};
use rill_replication::namespace::{ConfigDoc, Edit};
use rill_storage::{NodeName, message::StoredMessage};

use super::Mesh;
use crate::{client::Ctx, clock::sim_now};

/// How long [`super::MeshBuilder::build`] waits for the namespaces to reach every node.
const SETUP_MAX: Duration = Duration::from_secs(120);
/// How often the convergence wait polls the nodes.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// How long a node's stats or catalogue may take to answer (it may be restarting).
const ASK_MAX: Duration = Duration::from_secs(30);
/// How long reading a whole topic may take (a node may be restarting and recovering).
const READ_MAX: Duration = Duration::from_secs(600);
/// The pause between attempts of a retried call.
const RETRY_EVERY: Duration = Duration::from_millis(300);
/// The subscription [`Mesh::holdings`] reads through.
pub const READER_SUBSCRIPTION: &str = "rill-sim-reader";

/// Replication lag from one node to a peer, as the sending node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lag {
    /// True when the link is up.
    pub connected: bool,
    /// Messages not yet known to be at the peer, over all topics.
    pub messages: u64,
    /// Their bytes on disk.
    pub bytes: u64,
    /// Age of the oldest of them, in milliseconds.
    pub oldest_ms: u64,
}

impl Mesh {
    /// Runs `f` on a hidden client until it answers, for at most `limit` of simulated
    /// time. The mesh runs on (faults included) meanwhile.
    pub(super) fn query<T, F, Fut>(&mut self, what: &str, limit: Duration, f: F) -> anyhow::Result<T>
    where
        T: 'static,
        F: FnOnce(Ctx) -> Fut,
        Fut: Future<Output = anyhow::Result<T>> + 'static,
    {
        let name = format!("rill-sim-query-{}", self.hosts_added + 1);
        let ctx = self.ctx(&name);
        let slot: Rc<RefCell<Option<anyhow::Result<T>>>> = Rc::new(RefCell::new(None));
        let (answer, future) = (Rc::clone(&slot), f(ctx));
        self.sim.client(name.as_str(), async move {
            *answer.borrow_mut() = Some(future.await);
            Ok(())
        });
        let deadline = self.now() + limit;
        loop {
            if let Some(result) = slot.borrow_mut().take() {
                return result.with_context(|| what.to_string());
            }
            if self.now() >= deadline {
                bail!("{what}: no answer within {limit:?} of simulated time");
            }
            self.step()?;
        }
    }

    fn check_node(&self, node: &str) -> anyhow::Result<()> {
        if self.nodes.iter().any(|n| n == node) { Ok(()) } else { bail!("no node named {node:?} in {:?}", self.nodes) }
    }

    /// A node's statistics (topics, subscriptions, peers and their lag), now.
    pub fn stats(&mut self, node: &str) -> anyhow::Result<NodeStats> {
        self.check_node(node)?;
        let n = node.to_string();
        self.query(&format!("stats of {node}"), ASK_MAX, |ctx| async move {
            Ok(retry(&ctx, &n, |c| async move { c.stats().await }).await?)
        })
    }

    /// The namespace catalogue as a node holds it, now.
    pub fn catalogue(&mut self, node: &str) -> anyhow::Result<ConfigDoc> {
        self.check_node(node)?;
        let n = node.to_string();
        self.query(&format!("catalogue of {node}"), ASK_MAX, |ctx| async move {
            Ok(retry(&ctx, &n, |c| async move { c.ns_get().await }).await?)
        })
    }

    /// Replication lag from `from` to its peer `to`, now, as `from` sees it.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # fn main() -> anyhow::Result<()> {
    /// # let mut mesh = rill_sim::Mesh::builder(1).edge("gw").region("eu").link("gw", "eu").build()?;
    /// mesh.at(mesh.now()).isolate("gw");
    /// mesh.run_for(Duration::from_secs(600))?;
    /// let lag = mesh.lag("gw", "eu")?;
    /// assert!(!lag.connected);
    /// println!("{} messages, the oldest {} ms old, wait at the gateway", lag.messages, lag.oldest_ms);
    /// # Ok(())
    /// # }
    /// ```
    pub fn lag(&mut self, from: &str, to: &str) -> anyhow::Result<Lag> {
        let stats = self.stats(from)?;
        let peer =
            stats.peers.iter().find(|p| p.name == to).with_context(|| format!("{to} is not a peer of {from}"))?;
        Ok(Lag {
            connected: peer.connected,
            messages: peer.lanes.iter().map(|l| l.lag_messages).sum(),
            bytes: peer.lanes.iter().map(|l| l.lag_bytes).sum(),
            oldest_ms: peer.lanes.iter().map(|l| l.lag_ms).max().unwrap_or(0),
        })
    }

    /// Every message `node` holds for `topic`, in its log order. Reads through the
    /// subscription [`READER_SUBSCRIPTION`], moved back to the start for each read (like
    /// any subscription, it keeps what it has not acknowledged from retention).
    pub fn holdings(&mut self, node: &str, topic: &str) -> anyhow::Result<Vec<StoredMessage>> {
        self.check_node(node)?;
        let (n, t) = (node.to_string(), topic.to_string());
        self.query(
            &format!("what {node} holds of {topic}"),
            READ_MAX,
            |ctx| async move { read_topic(&ctx, &n, &t).await },
        )
    }

    /// Runs until `namespace` has converged, for at most `limit` of simulated time:
    /// every reachable node holds the same catalogue, every node in the namespace's
    /// clusters is up and holds the same number of messages of each of its topics, and
    /// nothing is left to replicate between them. Answers how long it took. (With a
    /// retention policy, nodes may hold different counts: wait on [`Mesh::lag`] instead.)
    pub fn wait_converged(&mut self, namespace: &str, limit: Duration) -> anyhow::Result<Duration> {
        let started = self.now();
        let (ns, nodes, down) = (namespace.to_string(), self.nodes.clone(), Rc::clone(&self.down));
        let what = format!("convergence of {namespace}");
        self.query(&what, limit + ASK_MAX, move |ctx| async move {
            let deadline = sim_now() + limit;
            loop {
                let up: Vec<String> = nodes.iter().filter(|n| !down.borrow().contains(*n)).cloned().collect();
                match converged(&ctx, &ns, &up).await {
                    Ok(()) => return Ok(sim_now() - started),
                    Err(why) if sim_now() >= deadline => bail!("not converged after {limit:?}: {why}"),
                    Err(_) => ctx.sleep(POLL_EVERY).await,
                }
            }
        })
    }

    /// Creates the namespaces through their first cluster node, then waits until every
    /// node knows them.
    pub(super) fn create_namespaces(&mut self, namespaces: &[(String, BTreeSet<String>)]) -> anyhow::Result<()> {
        if namespaces.is_empty() {
            return Ok(());
        }
        let (namespaces, nodes) = (namespaces.to_vec(), self.nodes.clone());
        self.query("creating the namespaces", SETUP_MAX, |ctx| async move {
            for (ns, clusters) in &namespaces {
                let via = clusters.first().expect("checked: clusters not empty");
                let (ns, clusters) = (ns.clone(), clusters.clone());
                retry(&ctx, via, |c| {
                    let (ns, clusters) = (ns.clone(), clusters.clone());
                    async move {
                        c.ns_edit(&ns, Edit::Create).await?;
                        let names = clusters.iter().map(|n| NodeName::parse(n).expect("checked by the builder"));
                        c.ns_edit(&ns, Edit::SetClusters(names.collect())).await
                    }
                })
                .await?;
            }
            for node in &nodes {
                loop {
                    let doc = retry(&ctx, node, |c| async move { c.ns_get().await }).await?;
                    if namespaces.iter().all(|(ns, _)| doc.get(ns).is_some()) {
                        break;
                    }
                    ctx.sleep(POLL_EVERY).await;
                }
            }
            Ok(())
        })
    }
}

/// Runs `call` on a connection to `node`, reconnecting and retrying while the failure is
/// retriable (the node restarting, a partition): the harness's own reads must not fail
/// because of the faults under test. The query's time limit bounds it.
async fn retry<T, F, Fut>(ctx: &Ctx, node: &str, call: F) -> Result<T, ClientError>
where
    F: Fn(Client) -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    loop {
        let result = match ctx.connect(node).await {
            Ok(client) => call(client).await,
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.is_retriable() => ctx.sleep(RETRY_EVERY).await,
            other => return other,
        }
    }
}

/// Reads all of `topic` on `node` (see [`Mesh::holdings`]).
async fn read_topic(ctx: &Ctx, node: &str, topic: &str) -> anyhow::Result<Vec<StoredMessage>> {
    Ok(retry(ctx, node, |client| read_from(client, topic.to_string())).await?)
}

/// One attempt at [`read_topic`] on a connection; a node that goes away mid-read is a
/// retriable error.
async fn read_from(client: Client, topic: String) -> Result<Vec<StoredMessage>, ClientError> {
    let stats = client.stats().await?;
    let Some(t) = stats.topics.iter().find(|t| t.topic == topic) else { return Ok(Vec::new()) };
    if t.end_offset == t.start_offset {
        return Ok(Vec::new());
    }
    // Back to the start (a new subscription fails with NotFound and starts there).
    let _ = client.seek(&topic, READER_SUBSCRIPTION, SeekTarget::Earliest).await;
    let mut consumer = client.subscribe(&topic, READER_SUBSCRIPTION, StartPosition::Earliest).await?;
    let mut held: Vec<StoredMessage> = Vec::new();
    while held.last().is_none_or(|m| m.offset + 1 < t.end_offset) {
        let m = consumer.next().await?.ok_or(ClientError::Closed)?;
        consumer.ack(m.offset);
        held.push(m);
    }
    let _ = consumer.close().await;
    Ok(held)
}

/// Why `namespace` has not converged among the `up` nodes, if it has not.
async fn converged(ctx: &Ctx, namespace: &str, up: &[String]) -> Result<(), String> {
    // `Ctx::connect` gives up after CONNECT_TIMEOUT.
    let connect = |node: String| async move { ctx.connect(&node).await.map_err(|_| format!("{node} does not answer")) };
    let mut docs = BTreeMap::new();
    for node in up {
        let client = connect(node.clone()).await?;
        docs.insert(node.clone(), client.ns_get().await.map_err(|e| format!("{node}: {e}"))?);
    }
    let first = docs.values().next().ok_or("no node is up")?;
    if let Some((node, _)) = docs.iter().find(|(_, d)| *d != first) {
        return Err(format!("{node} holds another catalogue than {}", docs.keys().next().expect("one")));
    }
    let policy = first.get(namespace).ok_or_else(|| format!("no node knows {namespace}"))?;
    let clusters: BTreeSet<String> = policy.clusters.val.iter().map(ToString::to_string).collect();
    let clusters = &clusters;
    let prefix = format!("{namespace}/");
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for node in clusters {
        if !up.contains(node) {
            return Err(format!("{node} is down"));
        }
        let stats = connect(node.clone()).await?.stats().await.map_err(|e| format!("{node}: {e}"))?;
        for peer in stats.peers.iter().filter(|p| clusters.contains(&p.name)) {
            for lane in peer.lanes.iter().filter(|l| l.topic.starts_with(&prefix)) {
                if lane.lag_messages > 0 || lane.in_flight > 0 {
                    return Err(format!(
                        "{node} has {} messages of {} to send to {}",
                        lane.lag_messages, lane.topic, peer.name
                    ));
                }
            }
        }
        for t in stats.topics.iter().filter(|t| t.topic.starts_with(&prefix)) {
            counts.entry(t.topic.clone()).or_default().insert(node.clone(), t.end_offset - t.start_offset);
        }
    }
    for (topic, per_node) in &counts {
        let want = per_node.values().max().copied().unwrap_or(0);
        for node in clusters {
            let have = per_node.get(node).copied().unwrap_or(0);
            if have != want {
                return Err(format!("{node} holds {have} messages of {topic}, another node {want}"));
            }
        }
    }
    Ok(())
}
