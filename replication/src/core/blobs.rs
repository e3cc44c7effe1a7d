//! Blob replication (DESIGN section 8): modules (and later models) named by SHA-256 in
//! catalogue entries travel between nodes in chunks, outside the catalogue and the Hello.
//!
//! A node *wants* a blob when an entry in force names it and the node is among the
//! entry's nodes (the clusters of the namespaces it touches, and its explicit nodes).
//! It pulls what it wants and lacks from a greeted peer that holds it and is among the
//! same nodes: `BlobWant` asks for a window of bytes, the peer answers with `BlobChunk`s
//! in order on the link's blob stream (or `BlobMissing`), and the node asks for the next
//! window when one is complete. The whole blob is checked against its hash before it is
//! stored; then it is announced (`Blobs`) to every peer. A failed attempt (the peer lacks
//! it, the link closed, silence, a wrong hash) backs off and tries again, from any peer
//! that holds it.
//!
//! Pull, not push ahead of the catalogue: a Hello carries the whole catalogue, so a
//! definition can reach a node before its module; it stays inert there (the functions
//! driver waits for the module) until the blob is stored, which from outside is the same
//! order.
use std::collections::{BTreeMap, BTreeSet};

use rill_storage::{NodeName, blobs::Hash};

use super::{Action, PeerMessage, Replicator};
use crate::{access::Access, link::LinkId, namespace::ConfigDoc};

/// Bytes per chunk message: well inside the peer frame limit.
pub const BLOB_CHUNK_BYTES: u64 = 1 << 20;
/// Bytes asked for at once: a few chunks in flight per fetch.
const WINDOW_BYTES: u64 = 4 * BLOB_CHUNK_BYTES;
/// The largest blob accepted from a peer (a model may be up to 64 MiB).
pub const BLOB_BYTES_MAX: u64 = 64 << 20;
/// Fetches in flight at once (each buffers its blob in memory).
const FETCHES_MAX: usize = 4;
/// A fetch that hears nothing for this long is given up and retried.
const SILENCE_MS: u64 = 30_000;
/// After a failed attempt, the wait before the next.
const BACKOFF_MS: u64 = 2_000;

/// One blob being pulled from one peer.
#[derive(Debug)]
pub(super) struct Fetch {
    peer: NodeName,
    link: LinkId,
    /// The bytes received so far, in order.
    pub(super) bytes: Vec<u8>,
    /// The blob's length, from the first chunk.
    total: Option<u64>,
    /// The end of the window asked for.
    asked_to: u64,
    /// When the last chunk (or the ask) was seen.
    heard_ms: u64,
}

/// What the node knows about blobs.
#[derive(Debug, Default)]
pub(super) struct BlobSync {
    /// Blobs this node holds whole.
    held: BTreeSet<Hash>,
    /// Per greeted peer: the blobs it said it holds.
    peers: BTreeMap<NodeName, BTreeSet<Hash>>,
    /// Blobs named by entries in force, with the nodes that may exchange each.
    named: BTreeMap<Hash, BTreeSet<NodeName>>,
    pub(super) fetches: BTreeMap<Hash, Fetch>,
    /// Not before this time, after a failed attempt.
    backoff: BTreeMap<Hash, u64>,
    /// Latest time seen.
    now_ms: u64,
    /// Blobs that came out of order, too long, or whole with a wrong hash, since start.
    pub(super) refused: u64,
}

/// Per blob named by a function in force, the nodes that may hold it: the clusters of
/// every namespace the function touches, and its explicit nodes.
pub(super) fn named_blobs(config: &ConfigDoc) -> BTreeMap<Hash, BTreeSet<NodeName>> {
    let mut named: BTreeMap<Hash, BTreeSet<NodeName>> = BTreeMap::new();
    for (_, def) in Access::of(config.records()).functions().values() {
        let nodes = named.entry(def.module).or_default();
        for ns in def.namespaces() {
            nodes.extend(config.get(ns.as_str()).into_iter().flat_map(|p| p.clusters.val.iter().cloned()));
        }
        nodes.extend(def.nodes.iter().flatten().cloned());
    }
    named
}

/// What a driver sends for an [`Action::ReadBlob`], given what it read: chunks of at most [`BLOB_CHUNK_BYTES`] in order (one
/// empty chunk when nothing is left), or that it does not hold the blob.
pub fn blob_chunks(hash: Hash, offset: u64, read: Option<(u64, Vec<u8>)>) -> Vec<PeerMessage> {
    let Some((total, bytes)) = read else { return vec![PeerMessage::BlobMissing { hash }] };
    if bytes.is_empty() {
        return vec![PeerMessage::BlobChunk { hash, offset, total, bytes }];
    }
    let chunk = usize::try_from(BLOB_CHUNK_BYTES).unwrap_or(usize::MAX);
    let mut at = offset;
    bytes
        .chunks(chunk)
        .map(|c| {
            let message = PeerMessage::BlobChunk { hash, offset: at, total, bytes: c.to_vec() };
            at += c.len() as u64;
            message
        })
        .collect()
}

impl BlobSync {
    pub(super) fn new(config: &ConfigDoc) -> BlobSync {
        BlobSync { named: named_blobs(config), ..BlobSync::default() }
    }

    pub(super) fn saw_time(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }
}

impl Replicator {
    /// The blobs this node holds at start (checked whole by the driver).
    pub fn restore_blobs(&mut self, held: impl IntoIterator<Item = Hash>) {
        self.blobs.held.extend(held);
    }

    /// The blobs this node holds, for its Hello.
    pub(super) fn held_blobs(&self) -> Vec<Hash> {
        self.blobs.held.iter().copied().collect()
    }

    /// Blobs this node wants and does not hold.
    pub fn missing_blobs(&self) -> Vec<Hash> {
        let me = &self.node;
        let wanted = self.blobs.named.iter().filter(|(_, nodes)| nodes.contains(me)).map(|(h, _)| *h);
        wanted.filter(|h| !self.blobs.held.contains(h)).collect()
    }

    /// Blob fetches refused for bad chunks or a wrong hash, since start.
    pub fn refused_blobs(&self) -> u64 {
        self.blobs.refused
    }

    /// A blob is now stored durably on this node (put by a client or fetched): peers
    /// hear of it.
    pub fn handle_blob_stored(&mut self, hash: Hash) {
        self.blobs.fetches.remove(&hash);
        self.blobs.backoff.remove(&hash);
        if !self.blobs.held.insert(hash) {
            return;
        }
        for (peer, p) in &self.peers {
            if let Some(link) = p.links.greeted() {
                let message = PeerMessage::Blobs(vec![hash]);
                self.actions.push_back(Action::Send { peer: peer.clone(), link, message });
            }
        }
    }

    /// Storing a fetched blob failed: try again later.
    pub fn handle_blob_store_failed(&mut self, hash: Hash) {
        self.blob_attempt_failed(hash);
        self.fetch_blobs();
    }

    /// The catalogue changed: which blobs are named may have too.
    pub(super) fn blobs_config_changed(&mut self) {
        self.blobs.named = named_blobs(&self.config);
        self.fetch_blobs();
    }

    /// A peer's Hello said which blobs it holds.
    pub(super) fn blobs_greeted(&mut self, peer: &NodeName, held: Vec<Hash>) {
        self.blobs.peers.insert(peer.clone(), held.into_iter().collect());
        self.fetch_blobs();
    }

    /// The current link to `peer` is gone: what it held is unknown until its next Hello,
    /// and fetches from it start again elsewhere.
    pub(super) fn blobs_link_lost(&mut self, peer: &NodeName) {
        self.blobs.peers.remove(peer);
        let lost: Vec<Hash> = self.blobs.fetches.iter().filter(|(_, f)| f.peer == *peer).map(|(h, _)| *h).collect();
        for hash in lost {
            self.blobs.fetches.remove(&hash);
        }
        self.fetch_blobs();
    }

    /// Time passed: silent fetches are given up, backed-off blobs are tried again.
    pub(super) fn blobs_tick(&mut self, now_ms: u64) {
        self.blobs.saw_time(now_ms);
        let silent: Vec<Hash> = self
            .blobs
            .fetches
            .iter()
            .filter(|(_, f)| now_ms.saturating_sub(f.heard_ms) >= SILENCE_MS)
            .map(|(h, _)| *h)
            .collect();
        for hash in silent {
            self.blob_attempt_failed(hash);
        }
        self.fetch_blobs();
    }

    /// A blob message from `peer` on its current `link`.
    pub(super) fn handle_blob_message(&mut self, peer: &NodeName, link: LinkId, message: PeerMessage) {
        match message {
            PeerMessage::Blobs(hashes) => {
                if let Some(held) = self.blobs.peers.get_mut(peer) {
                    held.extend(hashes);
                }
                self.fetch_blobs();
            }
            PeerMessage::BlobWant { hash, offset, len } => {
                let shared = self.blobs.named.get(&hash).is_some_and(|n| n.contains(peer) && n.contains(&self.node));
                let action = if shared && self.blobs.held.contains(&hash) {
                    let len = len.min(WINDOW_BYTES);
                    Action::ReadBlob { peer: peer.clone(), link, hash, offset, len }
                } else {
                    Action::Send { peer: peer.clone(), link, message: PeerMessage::BlobMissing { hash } }
                };
                self.actions.push_back(action);
            }
            PeerMessage::BlobChunk { hash, offset, total, bytes } => {
                self.blob_chunk(peer, hash, offset, total, bytes);
            }
            PeerMessage::BlobMissing { hash } => {
                if let Some(held) = self.blobs.peers.get_mut(peer) {
                    held.remove(&hash);
                }
                if self.blobs.fetches.get(&hash).is_some_and(|f| f.peer == *peer) {
                    self.blob_attempt_failed(hash);
                }
                self.fetch_blobs();
            }
            _ => unreachable!("only blob messages come here"),
        }
    }

    fn blob_chunk(&mut self, peer: &NodeName, hash: Hash, offset: u64, total: u64, bytes: Vec<u8>) {
        let Some(fetch) = self.blobs.fetches.get_mut(&hash).filter(|f| f.peer == *peer) else { return };
        let fits = offset == fetch.bytes.len() as u64
            && total <= BLOB_BYTES_MAX
            && fetch.total.is_none_or(|t| t == total)
            && offset + bytes.len() as u64 <= total.min(fetch.asked_to)
            && (!bytes.is_empty() || offset == total);
        if !fits {
            // Out of order or too long: a broken peer; fetch again, from any peer.
            self.blobs.refused += 1;
            return self.blob_attempt_failed(hash);
        }
        fetch.total = Some(total);
        fetch.heard_ms = self.blobs.now_ms;
        fetch.bytes.extend_from_slice(&bytes);
        let got = fetch.bytes.len() as u64;
        if got == total {
            let Some(fetch) = self.blobs.fetches.remove(&hash) else { return };
            if rill_storage::blobs::hash(&fetch.bytes) == hash {
                self.actions.push_back(Action::StoreBlob { hash, bytes: fetch.bytes });
            } else {
                // Damaged on the peer's disk: fetch it elsewhere.
                self.blobs.refused += 1;
                if let Some(held) = self.blobs.peers.get_mut(peer) {
                    held.remove(&hash);
                }
                self.blobs.backoff.insert(hash, self.blobs.now_ms + BACKOFF_MS);
            }
        } else if got == fetch.asked_to {
            fetch.asked_to = (got + WINDOW_BYTES).min(total);
            let (link, len) = (fetch.link, fetch.asked_to - got);
            let message = PeerMessage::BlobWant { hash, offset: got, len };
            self.actions.push_back(Action::Send { peer: peer.clone(), link, message });
        }
    }

    fn blob_attempt_failed(&mut self, hash: Hash) {
        self.blobs.fetches.remove(&hash);
        self.blobs.backoff.insert(hash, self.blobs.now_ms + BACKOFF_MS);
    }

    /// Starts fetches of missing blobs, up to the limit, each from the first greeted peer
    /// (by name) that holds it and may exchange it.
    pub(super) fn fetch_blobs(&mut self) {
        let now = self.blobs.now_ms;
        self.blobs.backoff.retain(|_, until| *until > now);
        for hash in self.missing_blobs() {
            if self.blobs.fetches.len() >= FETCHES_MAX {
                return;
            }
            if self.blobs.fetches.contains_key(&hash) || self.blobs.backoff.contains_key(&hash) {
                continue;
            }
            let nodes = &self.blobs.named[&hash];
            let source = self.blobs.peers.iter().find(|(peer, held)| held.contains(&hash) && nodes.contains(*peer));
            let Some((peer, _)) = source else { continue };
            let Some(link) = self.peers.get(peer).and_then(|p| p.links.greeted()) else { continue };
            let peer = peer.clone();
            let fetch = Fetch {
                peer: peer.clone(),
                link,
                bytes: Vec::new(),
                total: None,
                asked_to: WINDOW_BYTES,
                heard_ms: now,
            };
            self.blobs.fetches.insert(hash, fetch);
            let message = PeerMessage::BlobWant { hash, offset: 0, len: WINDOW_BYTES };
            self.actions.push_back(Action::Send { peer, link, message });
        }
    }
}
