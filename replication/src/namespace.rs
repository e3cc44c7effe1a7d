//! The namespace catalogue and policies as one CRDT document.
//!
//! Each namespace (`tenant/namespace`) holds one last-writer-wins register per policy
//! field (`crdts::LWWReg`), stamped with (hybrid logical time, node name). Merge is
//! per-field "greater stamp wins", so:
//! - edits on any node, also during a partition, converge once the nodes exchange
//!   documents, whatever the order or repetition of exchanges;
//! - concurrent edits of *different* fields both survive;
//! - concurrent edits of the *same* field resolve to the edit with the later hybrid time,
//!   ties broken by the greater node name. Every node applies the same rule, so all pick
//!   the same winner.
//!
//! The document also holds the signed entries of [`crate::access`] (grants and tokens),
//! which merge by their own rule: a union per incarnation, each part verified first.
//!
//! Namespaces are never removed (entries can be; namespaces do not use that yet).
use std::collections::{BTreeMap, BTreeSet};

use crdts::LWWReg;
use rill_storage::{NamespaceName, NodeName, name::check_part};
use serde::{Deserialize, Serialize};

use crate::{
    access::{EntryError, Records, Signed, Verify},
    hlc::Hlc,
};

/// Who changed a field and when; greater wins.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Hybrid logical time of the edit.
    pub hlc: Hlc,
    /// The node that made the edit (breaks ties between equal times). A string, not a
    /// `NodeName`: a field never written carries the default stamp, whose node is empty.
    pub node: String,
}

/// A field of a namespace's policy.
pub type Field<V> = LWWReg<V, Stamp>;

/// What a producer gets when a namespace's backlog is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnFull {
    /// Refuse new messages with a "backlog full" error.
    #[default]
    Reject,
    /// Drop the oldest segments.
    DropOldest,
}

/// One namespace's policy; every field converges on its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespacePolicy {
    /// Nodes that must hold the namespace.
    pub clusters: Field<BTreeSet<NodeName>>,
    /// Keep messages at most this long (seconds); `None`: no age limit.
    pub retention_age_s: Field<Option<u64>>,
    /// Keep at most this many bytes per topic; `None`: no size limit.
    pub retention_bytes: Field<Option<u64>>,
    /// Keep at most this many messages per topic; `None`: no count limit.
    pub retention_messages: Field<Option<u64>>,
    /// Backlog limit per namespace in bytes; `None`: unlimited.
    pub backlog_bytes_max: Field<Option<u64>>,
    /// What happens when the backlog limit is reached.
    pub on_full: Field<OnFull>,
    /// Producer sessions idle this long (seconds) may be dropped from dedup state, keeping
    /// their highest seq; `None`: [`DEDUP_HORIZON_DEFAULT_S`]. Never below the retention age.
    pub dedup_horizon_s: Field<Option<u64>>,
}

/// The dedup horizon when a namespace sets none: 30 days (DESIGN section 2).
pub const DEDUP_HORIZON_DEFAULT_S: u64 = 30 * 86_400;

/// The version byte in front of a stored catalogue ([`ConfigDoc::encode`]).
pub const CATALOGUE_VERSION: u8 = 3;

/// The catalogue of version 2 (namespaces only).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ConfigDocV2 {
    namespaces: BTreeMap<NamespaceName, NamespacePolicy>,
}

/// The policy of wave 1 (catalogue version 1, stored without a version byte).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct NamespacePolicyV1 {
    clusters: Field<BTreeSet<NodeName>>,
    retention_age_s: Field<Option<u64>>,
    retention_bytes: Field<Option<u64>>,
    retention_messages: Field<Option<u64>>,
    backlog_bytes_max: Field<Option<u64>>,
    on_full: Field<OnFull>,
}

/// The catalogue of wave 1.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ConfigDocV1 {
    namespaces: BTreeMap<NamespaceName, NamespacePolicyV1>,
}

/// A change made on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Edit {
    /// Creates the namespace (a no-op if it exists).
    Create,
    /// Sets the nodes that hold it.
    SetClusters(BTreeSet<NodeName>),
    /// Sets the retention age.
    RetentionAge(Option<u64>),
    /// Sets the retention size.
    RetentionBytes(Option<u64>),
    /// Sets the retention count.
    RetentionMessages(Option<u64>),
    /// Sets the backlog limit.
    BacklogBytesMax(Option<u64>),
    /// Sets the backlog policy.
    OnFull(OnFull),
    /// Sets the dedup horizon (seconds; `None`: the default).
    DedupHorizon(Option<u64>),
}

/// Why an edit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// The namespace name is invalid.
    #[error("namespace '{name}': {reason}")]
    Name {
        /// The name given.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A cluster list names an invalid node.
    #[error("cluster list: {0}")]
    Node(String),
    /// The namespace does not exist.
    #[error("namespace '{0}' does not exist; create it first")]
    Unknown(String),
}

/// Checks a `tenant/namespace` name.
pub fn check_namespace(name: &str) -> Result<(), EditError> {
    let bad = |reason: String| EditError::Name { name: name.to_string(), reason };
    let parts: Vec<&str> = name.split('/').collect();
    let [tenant, ns] = parts[..] else { return Err(bad("must have the form tenant/namespace".into())) };
    for part in [tenant, ns] {
        check_part("namespace", part).map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

/// Merges a register; true when it changed.
fn merge_field<V: Clone + PartialEq>(ours: &mut Field<V>, theirs: &Field<V>) -> bool {
    let changed = theirs.marker > ours.marker;
    ours.update(theirs.val.clone(), theirs.marker.clone());
    changed
}

impl NamespacePolicy {
    fn merge(&mut self, other: &NamespacePolicy) -> bool {
        // Non-short-circuiting `|`: every field merges.
        merge_field(&mut self.clusters, &other.clusters)
            | merge_field(&mut self.retention_age_s, &other.retention_age_s)
            | merge_field(&mut self.retention_bytes, &other.retention_bytes)
            | merge_field(&mut self.retention_messages, &other.retention_messages)
            | merge_field(&mut self.backlog_bytes_max, &other.backlog_bytes_max)
            | merge_field(&mut self.on_full, &other.on_full)
            | merge_field(&mut self.dedup_horizon_s, &other.dedup_horizon_s)
    }

    /// How long a producer session may stay idle before its dedup state may be dropped,
    /// in milliseconds: the horizon set (or the default), never below the retention age,
    /// so an id is remembered at least as long as its message may be held.
    pub fn dedup_horizon_ms(&self) -> u64 {
        let horizon = self.dedup_horizon_s.val.unwrap_or(DEDUP_HORIZON_DEFAULT_S);
        horizon.max(self.retention_age_s.val.unwrap_or(0)).saturating_mul(1000)
    }

    fn apply(&mut self, edit: Edit, stamp: Stamp) {
        match edit {
            Edit::Create => {}
            Edit::SetClusters(c) => self.clusters.update(c, stamp),
            Edit::RetentionAge(v) => self.retention_age_s.update(v, stamp),
            Edit::RetentionBytes(v) => self.retention_bytes.update(v, stamp),
            Edit::RetentionMessages(v) => self.retention_messages.update(v, stamp),
            Edit::BacklogBytesMax(v) => self.backlog_bytes_max.update(v, stamp),
            Edit::OnFull(v) => self.on_full.update(v, stamp),
            Edit::DedupHorizon(v) => self.dedup_horizon_s.update(v, stamp),
        }
    }

    /// The largest stamp in the policy.
    fn max_stamp(&self) -> &Stamp {
        [
            &self.clusters.marker,
            &self.retention_age_s.marker,
            &self.retention_bytes.marker,
            &self.retention_messages.marker,
            &self.backlog_bytes_max.marker,
            &self.on_full.marker,
            &self.dedup_horizon_s.marker,
        ]
        .into_iter()
        .max()
        .expect("seven fields")
    }
}

/// The whole catalogue: namespace name -> policy. A document holding only some namespaces
/// is a valid delta: merging it changes only those.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDoc {
    namespaces: BTreeMap<NamespaceName, NamespacePolicy>,
    /// Grants and tokens.
    records: Records,
}

impl ConfigDoc {
    /// Merges `other` in, verifying each signed entry part with `verify`; returns what
    /// changed (as a delta document) and why entry parts were refused.
    pub fn merge(&mut self, other: &ConfigDoc, verify: &dyn Verify) -> (ConfigDoc, Vec<String>) {
        let (records, refused) = self.records.merge(&other.records, verify);
        let mut delta = ConfigDoc { namespaces: BTreeMap::new(), records };
        for (name, theirs) in &other.namespaces {
            let (changed, ours) = match self.namespaces.get_mut(name) {
                Some(ours) => (ours.merge(theirs), ours),
                None => (true, self.namespaces.entry(name.clone()).or_insert_with(|| theirs.clone())),
            };
            if changed {
                delta.namespaces.insert(name.clone(), ours.clone());
            }
        }
        (delta, refused)
    }

    /// Takes a signed creation or deletion made through this node; returns the delta to
    /// gossip (empty when the node already held it).
    pub fn apply_signed(&mut self, signed: Signed, verify: &dyn Verify) -> Result<ConfigDoc, EntryError> {
        let incarnation = signed.body.incarnation();
        let mut delta = ConfigDoc::default();
        if let Some(record) = self.records.apply(signed, verify)? {
            delta.records.insert(incarnation, record);
        }
        Ok(delta)
    }

    /// The signed entries (grants, tokens).
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// Keeps the namespaces and entries a viewer may see.
    pub fn retain(
        &mut self,
        mut namespace: impl FnMut(&NamespaceName) -> bool,
        record: impl FnMut(&crate::access::Record) -> bool,
    ) {
        self.namespaces.retain(|n, _| namespace(n));
        self.records.retain(record);
    }

    /// Applies a local edit stamped `stamp`; returns the delta to gossip.
    pub fn apply(&mut self, namespace: &NamespaceName, edit: Edit, stamp: Stamp) -> Result<ConfigDoc, EditError> {
        if let Edit::SetClusters(nodes) = &edit {
            // Names that came over the wire were not validated on the way in.
            for n in nodes {
                NodeName::parse(n.as_str()).map_err(|e| EditError::Node(e.to_string()))?;
            }
        }
        let policy = match (&edit, self.namespaces.get_mut(namespace)) {
            (_, Some(p)) => p,
            (Edit::Create, None) => self.namespaces.entry(namespace.clone()).or_default(),
            (_, None) => return Err(EditError::Unknown(namespace.to_string())),
        };
        policy.apply(edit, stamp);
        let mut delta = ConfigDoc::default();
        delta.namespaces.insert(namespace.clone(), policy.clone());
        Ok(delta)
    }

    /// The policy of a namespace.
    pub fn get(&self, namespace: &str) -> Option<&NamespacePolicy> {
        self.namespaces.get(namespace)
    }

    /// Every namespace, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&NamespaceName, &NamespacePolicy)> {
        self.namespaces.iter()
    }

    /// True when `namespace` lists both nodes in its clusters.
    pub fn replicates_between(&self, namespace: &NamespaceName, a: &NodeName, b: &NodeName) -> bool {
        self.namespaces.get(namespace).is_some_and(|p| p.clusters.val.contains(a) && p.clusters.val.contains(b))
    }

    /// The largest stamp anywhere in the document (for the clock to observe).
    pub fn max_stamp(&self) -> Option<&Stamp> {
        self.namespaces.values().map(NamespacePolicy::max_stamp).max()
    }

    /// The stored form: [`CATALOGUE_VERSION`], then the postcard encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![CATALOGUE_VERSION];
        bytes.extend(postcard::to_stdvec(self).expect("a catalogue always encodes"));
        bytes
    }

    /// Reads [`ConfigDoc::encode`]'s form. `Err` names the version or the problem.
    pub fn decode(bytes: &[u8]) -> Result<ConfigDoc, String> {
        match bytes.split_first() {
            Some((&CATALOGUE_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| e.to_string()),
            Some((2, rest)) => {
                let v2: ConfigDocV2 = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
                Ok(ConfigDoc { namespaces: v2.namespaces, records: Records::default() })
            }
            Some((v, _)) => Err(format!("catalogue version {v} is not supported (this build reads 1 to 3)")),
            None => Err("empty catalogue record".into()),
        }
    }

    /// Reads a wave-1 catalogue (version 1, no version byte): every namespace gets the
    /// default dedup horizon.
    pub fn decode_v1(bytes: &[u8]) -> Result<ConfigDoc, String> {
        let v1: ConfigDocV1 = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
        let namespaces = v1
            .namespaces
            .into_iter()
            .map(|(name, p)| {
                let policy = NamespacePolicy {
                    clusters: p.clusters,
                    retention_age_s: p.retention_age_s,
                    retention_bytes: p.retention_bytes,
                    retention_messages: p.retention_messages,
                    backlog_bytes_max: p.backlog_bytes_max,
                    on_full: p.on_full,
                    dedup_horizon_s: Field::default(),
                };
                (name, policy)
            })
            .collect();
        Ok(ConfigDoc { namespaces, records: Records::default() })
    }

    /// True when the document holds no namespace and no entry.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These tests hold no signed entries.
    #[derive(Debug)]
    struct NoEntries;

    impl Verify for NoEntries {
        fn verify(&self, _: &Signed) -> Result<(), String> {
            Err("no entries here".into())
        }
    }

    fn stamp(ms: u64, node: &str) -> Stamp {
        Stamp { hlc: Hlc { wall_ms: ms, logical: 0 }, node: node.into() }
    }

    fn ns(name: &str) -> NamespaceName {
        NamespaceName::parse(name).unwrap()
    }

    fn nodes(names: &[&str]) -> BTreeSet<NodeName> {
        names.iter().map(|n| NodeName::parse(n).unwrap()).collect()
    }

    fn clusters(names: &[&str]) -> Edit {
        Edit::SetClusters(nodes(names))
    }

    #[test]
    fn partitioned_edits_converge_whatever_the_merge_order() {
        let mut a = ConfigDoc::default();
        let mut b = ConfigDoc::default();
        a.apply(&ns("acme/sensors"), Edit::Create, stamp(1, "a")).unwrap();
        b.merge(&a, &NoEntries);
        // Partition: both edit clusters; a also edits retention.
        a.apply(&ns("acme/sensors"), clusters(&["a", "x"]), stamp(10, "a")).unwrap();
        a.apply(&ns("acme/sensors"), Edit::RetentionAge(Some(3600)), stamp(11, "a")).unwrap();
        b.apply(&ns("acme/sensors"), clusters(&["b", "y"]), stamp(12, "b")).unwrap();
        let (mut ab, mut ba) = (a.clone(), b.clone());
        ab.merge(&b, &NoEntries);
        ba.merge(&a, &NoEntries);
        ba.merge(&a, &NoEntries); // repetition is harmless
        assert_eq!(ab, ba);
        let p = ab.get("acme/sensors").unwrap();
        assert_eq!(p.clusters.val, nodes(&["b", "y"]), "later edit wins");
        assert_eq!(p.retention_age_s.val, Some(3600), "an edit of another field survives");
    }

    #[test]
    fn equal_times_are_broken_by_node_name() {
        let mut a = ConfigDoc::default();
        a.apply(&ns("t/n"), Edit::Create, stamp(1, "a")).unwrap();
        let mut b = a.clone();
        a.apply(&ns("t/n"), clusters(&["a"]), stamp(5, "a")).unwrap();
        b.apply(&ns("t/n"), clusters(&["b"]), stamp(5, "b")).unwrap();
        a.merge(&b, &NoEntries);
        b.merge(&a, &NoEntries);
        assert_eq!(a, b);
        assert!(a.get("t/n").unwrap().clusters.val.contains("b"));
    }

    #[test]
    fn merge_reports_only_what_changed() {
        let mut a = ConfigDoc::default();
        a.apply(&ns("t/one"), Edit::Create, stamp(1, "a")).unwrap();
        a.apply(&ns("t/two"), Edit::Create, stamp(1, "a")).unwrap();
        let mut b = a.clone();
        let delta = b.apply(&ns("t/two"), clusters(&["a", "b"]), stamp(2, "b")).unwrap();
        let changed = a.merge(&delta, &NoEntries).0;
        assert_eq!(changed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["t/two"]);
        assert!(a.merge(&b, &NoEntries).0.is_empty(), "nothing new the second time");
        let (x, y) = (NodeName::parse("a").unwrap(), NodeName::parse("b").unwrap());
        assert!(a.replicates_between(&ns("t/two"), &x, &y) && !a.replicates_between(&ns("t/one"), &x, &y));
    }

    #[test]
    fn bad_edits_are_refused_by_name() {
        let mut d = ConfigDoc::default();
        assert!(matches!(check_namespace("acme"), Err(EditError::Name { .. })));
        assert!(matches!(check_namespace("acme/x y"), Err(EditError::Name { .. })));
        assert_eq!(d.apply(&ns("acme/s"), clusters(&["a"]), stamp(1, "a")), Err(EditError::Unknown("acme/s".into())));
        d.apply(&ns("acme/s"), Edit::Create, stamp(1, "a")).unwrap();
        // A name that came over the wire is not validated on the way in; the edit checks it.
        let wire: NodeName = postcard::from_bytes(&postcard::to_stdvec("bad node").unwrap()).unwrap();
        let err = d.apply(&ns("acme/s"), Edit::SetClusters([wire].into()), stamp(2, "a")).unwrap_err().to_string();
        assert!(err.contains("'bad node'"), "{err}");
    }

    #[test]
    fn a_wave_1_catalogue_reads_with_the_default_horizon_and_the_new_one_round_trips() {
        let mut v1 = ConfigDocV1::default();
        let mut p = NamespacePolicyV1::default();
        p.retention_age_s.update(Some(3600), stamp(4, "a"));
        v1.namespaces.insert(ns("t/n"), p);
        let doc = ConfigDoc::decode_v1(&postcard::to_stdvec(&v1).unwrap()).unwrap();
        let policy = doc.get("t/n").unwrap();
        assert_eq!((policy.retention_age_s.val, policy.dedup_horizon_s.val), (Some(3600), None));
        assert_eq!(policy.dedup_horizon_ms(), DEDUP_HORIZON_DEFAULT_S * 1000);
        assert_eq!(ConfigDoc::decode(&doc.encode()).unwrap(), doc);
        assert!(ConfigDoc::decode(&[9, 0]).unwrap_err().contains("version 9"));
        // Version 2 (namespaces only) reads with no entries.
        let v2 = ConfigDocV2 { namespaces: doc.namespaces.clone() };
        let mut bytes = vec![2];
        bytes.extend(postcard::to_stdvec(&v2).unwrap());
        assert_eq!(ConfigDoc::decode(&bytes).unwrap(), doc);
    }

    #[test]
    fn the_dedup_horizon_is_never_below_the_retention_age() {
        let mut d = ConfigDoc::default();
        d.apply(&ns("t/n"), Edit::Create, stamp(1, "a")).unwrap();
        d.apply(&ns("t/n"), Edit::DedupHorizon(Some(60)), stamp(2, "a")).unwrap();
        assert_eq!(d.get("t/n").unwrap().dedup_horizon_ms(), 60_000);
        d.apply(&ns("t/n"), Edit::RetentionAge(Some(7200)), stamp(3, "a")).unwrap();
        assert_eq!(d.get("t/n").unwrap().dedup_horizon_ms(), 7_200_000);
    }
}
