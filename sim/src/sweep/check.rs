//! Design section 5's invariants over what the checker read from the nodes and what the
//! clients recorded.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use rill_replication::namespace::ConfigDoc;

use super::{
    NAMESPACE,
    plan::Plan,
    workload::{Held, Record, lock},
};

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant (design section 5).
    pub invariant: u8,
    /// Where and what.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invariant {}: {}", self.invariant, self.detail)
    }
}

/// What a node holds under each (producer session, seq): the payload.
pub(super) type Contents = BTreeMap<(String, u64), String>;

/// A node's outputs of the sweep's function, by the (producer session, seq) of the input
/// each derives from: (output rank, payload) of each.
pub(super) type Outputs = BTreeMap<(String, u64), Vec<(u32, String)>>;

/// What the checker read from the nodes after the heal.
#[derive(Debug, Default)]
pub(super) struct Collected {
    /// Per node: the namespace catalogue.
    pub(super) catalogues: BTreeMap<String, ConfigDoc>,
    /// Per node: what it holds, in log order.
    pub(super) holdings: BTreeMap<String, Vec<Held>>,
    /// Per node: the payload it holds under each (producer session, seq).
    pub(super) contents: BTreeMap<String, Contents>,
    /// Per node: the function's outputs (none when it was never created).
    pub(super) outputs: BTreeMap<String, Outputs>,
}

/// The namespace's clusters as the (first) node's catalogue has them.
pub(super) fn final_clusters(catalogues: &BTreeMap<String, ConfigDoc>) -> BTreeSet<String> {
    let policy = catalogues.values().next().and_then(|c| c.get(NAMESPACE));
    policy.map(|p| p.clusters.val.iter().map(ToString::to_string).collect()).unwrap_or_default()
}

/// Invariant 6 on a node of the final clusters: each acknowledged input's output is there
/// exactly once, carrying the input's payload, and nothing else is.
fn check_outputs(node: &str, outputs: &Outputs, acked: &BTreeMap<(String, u64), String>) -> Vec<Violation> {
    let mut out = Vec::new();
    let missing: Vec<&(String, u64)> = acked.keys().filter(|id| !outputs.contains_key(*id)).take(5).collect();
    if !missing.is_empty() {
        out.push(Violation { invariant: 6, detail: format!("{node} lacks the outputs of acknowledged {missing:?}") });
    }
    let wrong: Vec<_> = outputs
        .iter()
        .filter(|(id, outs)| match acked.get(*id) {
            Some(payload) => **outs != [(0, payload.clone())],
            None => outs.len() != 1 || outs[0].0 != 0 || id.0 == "?",
        })
        .take(5)
        .collect();
    if !wrong.is_empty() {
        out.push(Violation {
            invariant: 6,
            detail: format!("{node}: outputs not once or not as their inputs: {wrong:?}"),
        });
    }
    out
}

/// Invariants 1-4 and 6 over what the checker and the subscriber read.
pub(super) fn check(plan: &Plan, collected: &Collected, record: &Record) -> Vec<Violation> {
    let mut out = Vec::new();
    let acked = lock(&record.acked);
    let clusters = final_clusters(&collected.catalogues);
    out.extend(twins(collected));
    if record.function_wanted && !*lock(&record.function_created) {
        out.push(Violation { invariant: 6, detail: "the stream function was never created".into() });
    }
    for node in &plan.nodes {
        out.extend(check_node(node, collected, &acked, clusters.contains(node)));
        if let Some(outputs) = collected.outputs.get(node).filter(|_| clusters.contains(node)) {
            out.extend(check_outputs(node, outputs, &acked));
        }
    }
    let node = &plan.consumer;
    let delivered = lock(&record.delivered);
    let never: Vec<&Held> =
        collected.holdings.get(node).into_iter().flatten().filter(|m| !delivered.0.contains(*m)).take(5).collect();
    if !never.is_empty() {
        out.push(Violation { invariant: 1, detail: format!("the subscriber on {node} never received {never:?}") });
    }
    if let Some(v) = out_of_order(&delivered.1) {
        out.push(Violation { invariant: 3, detail: format!("the subscriber on {node} first received {v}") });
    }
    let catalogues = &collected.catalogues;
    if catalogues.values().any(|c| Some(c) != catalogues.values().next()) {
        let views: Vec<String> = catalogues.iter().map(|(n, c)| format!("{n}: {c:?}")).collect();
        out.push(Violation { invariant: 4, detail: format!("nodes hold different namespace catalogues: {views:?}") });
    }
    out
}

/// Invariant 1: an id names one content, on every node.
fn twins(collected: &Collected) -> Option<Violation> {
    let mut payloads: BTreeMap<&(String, u64), BTreeSet<&String>> = BTreeMap::new();
    for (id, payload) in collected.contents.values().flatten() {
        payloads.entry(id).or_default().insert(payload);
    }
    let twins: Vec<String> =
        payloads.iter().filter(|(_, p)| p.len() > 1).take(5).map(|(id, p)| format!("{id:?}: {p:?}")).collect();
    (!twins.is_empty())
        .then(|| Violation { invariant: 1, detail: format!("ids with two contents on the nodes: {twins:?}") })
}

/// Invariants 1-3 on one node: no duplicates, every acknowledged message with its
/// payload (on a node of the clusters), per-producer order.
fn check_node(
    node: &str,
    collected: &Collected,
    acked: &BTreeMap<(String, u64), String>,
    in_clusters: bool,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let held = collected.holdings.get(node).cloned().unwrap_or_default();
    let ids: Vec<(String, u64)> = held.iter().map(|(_, p, s)| (p.clone(), *s)).collect();
    let unique: BTreeSet<&(String, u64)> = ids.iter().collect();
    if unique.len() != ids.len() {
        let detail = format!("{node} holds {} duplicate message(s)", ids.len() - unique.len());
        out.push(Violation { invariant: 2, detail });
    }
    let missing: Vec<&(String, u64)> = acked.keys().filter(|id| !unique.contains(id)).take(5).collect();
    if in_clusters && !missing.is_empty() {
        out.push(Violation { invariant: 1, detail: format!("{node} lacks acknowledged {missing:?}") });
    }
    let contents = collected.contents.get(node);
    let changed: Vec<String> = acked
        .iter()
        .filter_map(|(id, payload)| {
            let held = contents?.get(id).filter(|held| *held != payload)?;
            Some(format!("{id:?} holds '{held}', acknowledged '{payload}'"))
        })
        .take(5)
        .collect();
    if !changed.is_empty() {
        out.push(Violation { invariant: 1, detail: format!("{node}: {changed:?}") });
    }
    if let Some(v) = out_of_order(&held) {
        out.push(Violation { invariant: 3, detail: format!("{node}: {v}") });
    }
    out
}

/// The first message that comes after a later one of the same producer through the same
/// node.
pub(super) fn out_of_order(messages: &[Held]) -> Option<String> {
    let mut last: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for (origin, producer, seq) in messages {
        if let Some(prev) = last.insert((origin, producer), *seq).filter(|&prev| prev >= *seq) {
            return Some(format!("{producer} seq {seq} (through {origin}) after seq {prev}"));
        }
    }
    None
}
