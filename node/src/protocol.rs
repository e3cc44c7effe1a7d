//! The client protocol (ALPN `rill-client/4`: principals, grants and tokens): the values carried in frames on bidirectional streams. Frame encoding
//! and its version byte live in `rill_transport::frame`; this module is the one place the
//! client protocol's shapes live.
//!
//! A stream carries one of three conversations:
//! - produce: any number of [`Request::Produce`], each answered in order by
//!   [`Response::Produced`] or [`Response::Error`]; a client may pipeline many requests;
//! - consume: one [`Request::Subscribe`], answered by [`Response::Subscribed`], then
//!   [`Response::Deliver`] pushed by the node and [`Request::Ack`] sent by the client;
//! - admin: [`Request::OpenProducer`], [`Request::ListTopics`], [`Request::Stats`], each
//!   answered by one response.
//!
//! Every request is authorised for the connection's principal first (`crate::authz`); a
//! refusal is [`ErrorCode::Forbidden`].
use rill_replication::{
    access::Signed,
    namespace::{ConfigDoc, Edit},
};
use rill_storage::{Message, StoredMessage, topic::AppendOutcome};
use serde::{Deserialize, Serialize};

/// A message as a producer sends it; the node adds origin and publish time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    /// The producer's sequence number.
    pub seq: u64,
    /// Optional routing key.
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    /// Application headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The payload.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// Where a new subscription starts. Ignored when the subscription already exists: it
/// continues after its last ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartPosition {
    /// The first message held.
    Earliest,
    /// After the last message held now.
    Latest,
    /// A given offset.
    Offset(u64),
}

/// Where [`Request::Seek`] moves a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeekTarget {
    /// The first message held.
    Earliest,
    /// After the last message held now.
    Latest,
    /// A given offset.
    Offset(u64),
    /// The first message (in log order) published at or after this time, in milliseconds
    /// since the Unix epoch.
    PublishTime(u64),
}

/// Who chooses a producer session's sequence numbers (DESIGN section 2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeqMode {
    /// The producer counts from 0 in an epoch the node draws: a new session never reuses
    /// an old one's ids (a resend by a new session is stored again: at least once).
    #[default]
    Assigned,
    /// The caller chooses them (epoch 0) and guarantees that (producer, seq) names one
    /// message forever: a resend after the caller's own restart is stored once.
    Chosen,
}

/// Client to node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Opens a producer session on a topic: for assigned seqs the node draws its epoch.
    OpenProducer {
        /// `tenant/namespace/topic`.
        topic: String,
        /// The producer id.
        producer: String,
        /// Who chooses the sequence numbers.
        seqs: SeqMode,
    },
    /// Appends messages (atomically: all are validated before any is stored).
    Produce {
        /// `tenant/namespace/topic`.
        topic: String,
        /// The producer id.
        producer: String,
        /// The session's epoch (0: caller-chosen seqs).
        epoch: u64,
        /// The messages.
        messages: Vec<NewMessage>,
    },
    /// Attaches this stream to a subscription.
    Subscribe {
        /// `tenant/namespace/topic`.
        topic: String,
        /// Subscription name.
        subscription: String,
        /// Where a new subscription starts.
        start: StartPosition,
        /// How this consumer shares the subscription, and its redelivery policy.
        options: ConsumerOptions,
    },
    /// Acknowledges delivered offsets (on a subscription stream).
    Ack {
        /// The offsets.
        offsets: Vec<u64>,
    },
    /// Acknowledges every offset up to and including this one (Exclusive and Failover).
    AckCumulative {
        /// The offset.
        offset: u64,
    },
    /// Asks for delivered offsets to be delivered again after the consumer's nack delay.
    Nack {
        /// The offsets.
        offsets: Vec<u64>,
    },
    /// Moves a subscription: every message before the target counts as acked, none after
    /// it. Its consumers are disconnected (they attach again and continue from there).
    Seek {
        /// `tenant/namespace/topic`.
        topic: String,
        /// Subscription name (it must exist).
        subscription: String,
        /// Where to.
        target: SeekTarget,
    },
    /// Lists topics.
    ListTopics,
    /// Node statistics.
    Stats,
    /// Changes a namespace (creates it, sets its clusters or a policy field).
    NsEdit {
        /// `tenant/namespace`.
        namespace: String,
        /// The change.
        edit: Edit,
    },
    /// The namespace catalogue as this node sees it.
    NsGet,
    /// The node's kept conflicts, of one topic or of all.
    ListConflicts {
        /// `tenant/namespace/topic`, or `None` for every topic.
        topic: Option<String>,
    },
    /// Deletes a subscription: its cursor and ack state. Refused while consumers are
    /// attached. Retention no longer waits for it.
    DeleteSubscription {
        /// `tenant/namespace/topic`.
        topic: String,
        /// Subscription name (it must exist).
        subscription: String,
    },
    /// Creates or deletes a catalogue entry (a grant or a token), signed by the
    /// connection's principal with its certificate's key.
    CatalogueEdit(Signed),
    /// Who the connection's principal is, or whom a bearer token names, and the grants
    /// that count for it.
    WhoAmI {
        /// A token to look up instead of the connection's principal.
        token: Option<String>,
    },
    /// Stores a blob (a function's module) on this node, for a definition in `namespace`
    /// to name by its SHA-256.
    PutBlob {
        /// `tenant/namespace`: the principal must administer it.
        namespace: String,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

/// How the consumers of one subscription share its messages (as in Apache Pulsar).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SubscriptionType {
    /// One consumer; a second is refused.
    #[default]
    Exclusive,
    /// One active consumer; the others stand by, in the order they attached, and the next
    /// takes over (with the unacked messages) when the active one goes.
    Failover,
    /// Messages go round-robin to every consumer.
    Shared,
    /// All messages of a key go to one consumer while it is attached; a key moves to
    /// another only once none of its messages is in flight.
    KeyShared,
}

impl std::str::FromStr for SubscriptionType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "exclusive" => Ok(SubscriptionType::Exclusive),
            "failover" => Ok(SubscriptionType::Failover),
            "shared" => Ok(SubscriptionType::Shared),
            "key_shared" | "keyshared" => Ok(SubscriptionType::KeyShared),
            _ => Err(format!("'{s}' is not a subscription type (exclusive, failover, shared, key_shared)")),
        }
    }
}

/// A consumer's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerOptions {
    /// How the subscription is shared.
    pub kind: SubscriptionType,
    /// The consumer's name, for statistics.
    pub name: String,
    /// Messages unacked this long are delivered again; `None`: never.
    pub ack_timeout_ms: Option<u64>,
    /// How long a nacked message waits before it is delivered again.
    pub nack_delay_ms: u64,
    /// A message delivered again more often than this goes to the dead-letter topic
    /// instead; `None`: it is delivered again forever.
    pub max_redeliveries: Option<u32>,
    /// The dead-letter topic; `None`: `<topic>-DLQ`.
    pub dead_letter_topic: Option<String>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            kind: SubscriptionType::Exclusive,
            name: String::new(),
            ack_timeout_ms: None,
            nack_delay_ms: 1000,
            max_redeliveries: None,
            dead_letter_topic: None,
        }
    }
}

/// What happened to one produced message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Produced {
    /// Stored at this offset.
    Stored(u64),
    /// Already held (a retry); stored earlier at this offset if the node remembers it.
    Duplicate(Option<u64>),
}

impl From<AppendOutcome> for Produced {
    fn from(o: AppendOutcome) -> Self {
        match o {
            AppendOutcome::Appended { offset } => Produced::Stored(offset),
            AppendOutcome::Duplicate { offset } => Produced::Duplicate(offset),
            // Produce refuses a request with a conflict as a whole (`OnConflict::Refuse`),
            // so no outcome of an answered request is one; were it, the id is held.
            AppendOutcome::Conflict { offset } => Produced::Duplicate(Some(offset)),
            AppendOutcome::Expired => Produced::Duplicate(None),
        }
    }
}

/// Error categories, so clients can decide whether to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A name is invalid.
    InvalidName,
    /// A message or frame is too large.
    TooLarge,
    /// A frame could not be decoded or was unexpected here.
    Malformed,
    /// The subscription already has a consumer.
    SubscriptionBusy,
    /// The disk is full; retry later.
    DiskFull,
    /// The node's storage failed; retry later.
    Storage,
    /// The node is shutting down; retry elsewhere or later.
    ShuttingDown,
    /// A namespace change was refused.
    Namespace,
    /// The namespace's backlog quota is full (`on_full = reject`); retry once consumers
    /// or replication catch up.
    BacklogFull,
    /// What the request names does not exist.
    NotFound,
    /// The principal holds no grant for this request.
    Forbidden,
    /// A message's id is held with a different content: the producer reused an id for
    /// another message. Nothing of the request was stored; retrying cannot help.
    Conflict,
    /// A message's id belongs to a producer session dropped after the namespace's dedup
    /// horizon; retrying cannot help.
    Expired,
}

impl ErrorCode {
    /// True when the same request may succeed later.
    pub fn is_retriable(self) -> bool {
        matches!(self, ErrorCode::DiskFull | ErrorCode::Storage | ErrorCode::ShuttingDown | ErrorCode::BacklogFull)
    }
}

/// Per-topic statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicStats {
    /// `tenant/namespace/topic`.
    pub topic: String,
    /// First offset held.
    pub start_offset: u64,
    /// One past the last durable offset.
    pub end_offset: u64,
    /// Bytes on disk.
    pub bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Producers tracked for dedup.
    pub producers: u64,
    /// Messages accepted since start.
    pub messages_in: u64,
    /// Retries answered as duplicates since start.
    pub duplicates: u64,
    /// Produce requests refused since start because an id was held with another content.
    pub conflicts_refused: u64,
    /// Replicated messages kept aside since start because their id was held with another
    /// content (`rill conflicts list` shows them).
    pub conflicts_kept: u64,
    /// Messages refused (produce: requests) or not stored (replication: messages) since
    /// start because their producer session was dropped after the dedup horizon.
    pub expired: u64,
    /// Producer sessions whose dedup state was dropped after the dedup horizon since start.
    pub dedup_sessions_dropped: u64,
    /// Messages deleted by retention since the node started (every subscription and
    /// peer had them).
    pub retention_deleted: u64,
    /// Messages dropped by a full backlog quota (`on_full = drop_oldest`) since the node
    /// started, before every subscription or peer had them.
    pub quota_dropped: u64,
    /// Subscriptions.
    pub subscriptions: Vec<SubscriptionStats>,
    /// Why the topic is unavailable (it failed to open at start-up), if it is.
    pub error: Option<String>,
}

/// Per-subscription statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionStats {
    /// Subscription name.
    pub name: String,
    /// Every offset below this is acked.
    pub ack_floor: u64,
    /// Messages not yet acked.
    pub backlog_messages: u64,
    /// Bytes on disk from the ack floor to the end.
    pub backlog_bytes: u64,
    /// How long ago the oldest unacked message was published (by its origin's clock).
    pub backlog_age_ms: Option<u64>,
    /// Consumers attached.
    pub consumers: u64,
    /// Messages given back to be delivered again (nacked, timed out, or held by a consumer
    /// that left) since the node started.
    pub redelivered: u64,
    /// Messages moved to the dead-letter topic since the node started.
    pub dead_lettered: u64,
    /// Size of the stored acked state (floor plus acked ranges), bytes.
    pub ack_state_bytes: u64,
}

/// Replication of one topic to one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneStats {
    /// `tenant/namespace/topic`.
    pub topic: String,
    /// Local messages not yet known to be at the peer.
    pub lag_messages: u64,
    /// Every local offset below this is at the peer.
    pub cursor: u64,
    /// Bytes on disk not yet known to be at the peer (to within 4 KiB).
    pub lag_bytes: u64,
    /// Age of the oldest message not yet known to be at the peer, milliseconds.
    pub lag_ms: u64,
    /// Batches sent and not yet acknowledged.
    pub in_flight: u64,
    /// Messages sent to the peer since this node started.
    pub sent: u64,
    /// Messages received from the peer since this node started.
    pub received: u64,
    /// Of those, how many this node already held.
    pub deduplicated: u64,
}

/// A configured peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    /// Its node name.
    pub name: String,
    /// True when the link is up and greeted.
    pub connected: bool,
    /// UDP bytes sent to the peer since this node started, over all links.
    pub link_bytes_sent: u64,
    /// Links to it that became current since this node started.
    pub link_ups: u64,
    /// Current links replaced by a newer one (a peer restart or a redial).
    pub link_replacements: u64,
    /// Links refused (duplicates, second links without a Hello).
    pub link_refusals: u64,
    /// When the last link event happened (node clock, ms since the Unix epoch).
    pub last_link_change_ms: Option<u64>,
    /// Per topic replicated to it.
    pub lanes: Vec<LaneStats>,
}

/// Node statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    /// The node's name.
    pub node: String,
    /// Milliseconds since the node started.
    pub uptime_ms: u64,
    /// The node's clock when it answered (ms since the Unix epoch), to read ages against.
    pub now_ms: u64,
    /// Topics.
    pub topics: Vec<TopicStats>,
    /// Peers and replication lag.
    pub peers: Vec<PeerStats>,
    /// Stream functions running on this node, per input topic.
    pub functions: Vec<FunctionStats>,
    /// Requests refused since start, per principal (for a superuser; others see their own).
    pub refusals: Vec<(String, u64)>,
    /// Catalogue entries peers sent that did not verify, since start.
    pub entries_refused: u64,
}

/// One function over one input topic on this node, since the function started here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionStats {
    /// `tenant/namespace/name`.
    pub name: String,
    /// The input topic.
    pub input: String,
    /// Inputs processed (owned, run, outputs written).
    pub processed: u64,
    /// Outputs written.
    pub emitted: u64,
    /// Inputs that gave no output.
    pub filtered: u64,
    /// Failed runs (of a batch, or of one input alone).
    pub failed: u64,
    /// Inputs dead-lettered.
    pub dead_lettered: u64,
    /// Outputs found already held (a re-run after a crash): not stored again.
    pub skipped_held: u64,
    /// Input messages not yet processed (from the cursor to the input's end).
    pub lag_messages: u64,
    /// Age of the oldest input not yet processed, milliseconds.
    pub lag_ms: u64,
    /// Time per run of the module (a batch or one input), microseconds: median and 99th
    /// percentile.
    pub run_p50_us: u64,
    /// See `run_p50_us`.
    pub run_p99_us: u64,
}

/// A replicated message kept aside in the node-local conflict store: its id was held with
/// a different content (answer to [`Request::ListConflicts`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptConflict {
    /// `tenant/namespace/topic`.
    pub topic: String,
    /// The message that was not stored in the log.
    pub message: Message,
    /// Where the log holds the content stored first under the same id.
    pub stored_offset: u64,
    /// The peer it came from.
    pub from_peer: String,
    /// When this node kept it (its clock, ms since the Unix epoch).
    pub kept_at_ms: u64,
}

/// Node to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::OpenProducer`].
    ProducerOpened {
        /// The session's epoch: 0 for caller-chosen seqs, else drawn by the node.
        epoch: u64,
        /// Where the session's seqs continue: 0 for a new epoch; with caller-chosen seqs
        /// one past the highest held (for information; the caller decides).
        next_seq: u64,
    },
    /// Answer to [`Request::Produce`], one entry per message, in order.
    Produced(Vec<Produced>),
    /// Answer to [`Request::Subscribe`].
    Subscribed {
        /// The offset deliveries start from.
        start_offset: u64,
    },
    /// Answer to [`Request::Seek`].
    Sought {
        /// The subscription's new position.
        offset: u64,
    },
    /// Messages pushed to a consumer.
    Deliver(Vec<StoredMessage>),
    /// Answer to [`Request::ListTopics`].
    Topics(Vec<TopicStats>),
    /// Answer to [`Request::Stats`].
    Stats(NodeStats),
    /// Answer to [`Request::NsEdit`].
    NsDone,
    /// Answer to [`Request::NsGet`].
    Namespaces(ConfigDoc),
    /// The request failed.
    Error {
        /// Category.
        code: ErrorCode,
        /// What went wrong, for a person.
        message: String,
    },
    /// Answer to [`Request::DeleteSubscription`].
    SubscriptionDeleted,
    /// Answer to [`Request::ListConflicts`].
    Conflicts(Vec<KeptConflict>),
    /// Answer to [`Request::CatalogueEdit`]: the edit is durable here and gossiped.
    CatalogueDone,
    /// Answer to [`Request::PutBlob`]: durable on this node.
    BlobStored {
        /// The SHA-256 of the bytes.
        hash: [u8; 32],
    },
    /// Answer to [`Request::WhoAmI`].
    Principal {
        /// The principal's name.
        name: String,
        /// True for a superuser.
        superuser: bool,
        /// Its grants that count, as `action resource`.
        grants: Vec<String>,
    },
}
