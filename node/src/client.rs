//! The client library: connect to a node, produce with pipelining and idempotent
//! retries, consume from a durable subscription, and admin calls. The CLI and the tests
//! use it; so can applications.
use std::{
    collections::VecDeque,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use rill_replication::access::{Signed, Signer};
use rill_storage::StoredMessage;
use rill_transport::{
    FrameError, Net, TokioNet,
    certs::{CertError, Identity, MESH_SERVER_NAME},
    frame::{self, FrameReader},
    tls::{self, ALPN_CLIENT, TlsError},
};
use tokio::time::Instant;

use crate::protocol::{
    ConsumerOptions, ErrorCode, NewMessage, NodeStats, Produced, Request, Response, SeekTarget, SeqMode, StartPosition,
    TopicStats,
};

/// Largest frame the client accepts from a node (a delivery is at most half of the
/// node's frame limit, 16 MiB by default).
const CLIENT_FRAME_BYTES_MAX: u32 = 64 << 20;
/// Longest [`Client::close`] waits for the node to confirm the close: a node that stalls
/// otherwise keeps a finished command waiting for QUIC's idle timeout.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Errors of client operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Client certificates could not be loaded.
    #[error("client certificates: {0}")]
    Certs(#[from] CertError),
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// No connection could be made.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The node's address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The connection broke.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The node refused the request.
    #[error("node refused the request ({code:?}): {message}")]
    Refused {
        /// Category.
        code: ErrorCode,
        /// The node's explanation.
        message: String,
    },
    /// The node answered something the protocol does not allow here.
    #[error("unexpected answer from the node: {0}")]
    Unexpected(String),
    /// The node closed the stream.
    #[error("the node closed the stream")]
    Closed,
    /// The client identity cannot sign.
    #[error("client identity: {0}")]
    Identity(String),
}

impl ClientError {
    /// True when retrying the same operation (perhaps after reconnecting) may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Refused { code, .. } => code.is_retriable(),
            ClientError::Connect { .. } | ClientError::Connection(_) | ClientError::Closed => true,
            ClientError::Frame(FrameError::Io(_) | FrameError::Truncated) => true,
            _ => false,
        }
    }
}

fn refused_or_unexpected(r: Response) -> ClientError {
    match r {
        Response::Error { code, message } => ClientError::Refused { code, message },
        other => ClientError::Unexpected(format!("{other:?}").chars().take(200).collect()),
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The node's address.
    pub addr: SocketAddr,
    /// Directory holding `ca.pem` and the identity's `.pem` and `.key`.
    pub certs_dir: PathBuf,
    /// The client identity: files `<identity>.pem` and `<identity>.key` (default
    /// `client`, the superuser `admin` of a dev setup).
    pub identity: String,
    /// Name the node's certificate must carry.
    pub server_name: String,
    /// Flow-control windows and liveness timeouts of the connection.
    pub limits: rill_transport::net::Limits,
}

impl ClientOptions {
    /// Options for `addr` with certificates from `certs_dir`.
    pub fn new(addr: SocketAddr, certs_dir: impl Into<PathBuf>) -> Self {
        ClientOptions {
            addr,
            certs_dir: certs_dir.into(),
            identity: rill_transport::certs::DEFAULT_IDENTITY.to_string(),
            server_name: MESH_SERVER_NAME.to_string(),
            limits: rill_transport::net::Limits::default(),
        }
    }

    /// The same, as the client identity `<certs_dir>/<identity>.pem`.
    pub fn with_identity(mut self, identity: &str) -> Self {
        self.identity = identity.to_string();
        self
    }
}

/// A connection to a node.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    conn: Connection,
    /// The identity connected with: it signs catalogue edits.
    identity: Arc<rill_transport::certs::LoadedIdentity>,
}

impl Client {
    /// Connects over real sockets.
    pub async fn connect(options: &ClientOptions) -> Result<Client, ClientError> {
        Self::connect_with(&TokioNet, options).await
    }

    /// Connects over the given network edge (the simulation passes its own).
    pub async fn connect_with(net: &dyn Net, options: &ClientOptions) -> Result<Client, ClientError> {
        let identity = Identity::node(&options.certs_dir, &options.identity).load()?;
        let crypto = tls::client_config(&identity, net.tls_time(), ALPN_CLIENT)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(options.limits.transport_config());
        let local: SocketAddr = match options.addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let addr = options.addr;
        let fail = |reason: String| ClientError::Connect { addr, reason };
        let mut endpoint = rill_transport::net::endpoint(net, local, None).await.map_err(|e| fail(e.to_string()))?;
        endpoint.set_default_client_config(config);
        let connecting = endpoint.connect(addr, &options.server_name).map_err(|e| fail(e.to_string()))?;
        let conn = connecting.await.map_err(|e| fail(e.to_string()))?;
        Ok(Client { endpoint, conn, identity: Arc::new(identity) })
    }

    /// Closes the connection, waiting at most [`CLOSE_WAIT`] for the node to confirm (a
    /// node that stalled must not keep a finished command running).
    pub async fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
    }

    /// Opens a bare stream, for tools and tests that speak the frame protocol directly.
    pub async fn open_stream(&self) -> Result<(SendStream, RecvStream), ClientError> {
        Ok(self.conn.open_bi().await?)
    }

    /// Sends one request on its own stream and reads the one answer.
    async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let (mut send, mut recv) = self.open_stream().await?;
        let mut buf = Vec::new();
        frame::write_frame(&mut send, request, &mut buf).await?;
        let _ = send.finish();
        frame::read_frame(&mut recv, CLIENT_FRAME_BYTES_MAX, &mut buf).await?.ok_or(ClientError::Closed)
    }

    /// Lists topics.
    pub async fn list_topics(&self) -> Result<Vec<TopicStats>, ClientError> {
        match self.call(&Request::ListTopics).await? {
            Response::Topics(t) => Ok(t),
            other => Err(refused_or_unexpected(other)),
        }
    }

    /// Node statistics.
    pub async fn stats(&self) -> Result<NodeStats, ClientError> {
        match self.call(&Request::Stats).await? {
            Response::Stats(s) => Ok(s),
            other => Err(refused_or_unexpected(other)),
        }
    }

    /// Changes a namespace on the node (it spreads to the mesh from there).
    pub async fn ns_edit(&self, namespace: &str, edit: rill_replication::namespace::Edit) -> Result<(), ClientError> {
        match self.call(&Request::NsEdit { namespace: namespace.into(), edit }).await? {
            Response::NsDone => Ok(()),
            other => Err(refused_or_unexpected(other)),
        }
    }

    /// Moves an existing subscription; answers its new position. Its consumers are
    /// disconnected and continue from there when they attach again.
    pub async fn seek(&self, topic: &str, subscription: &str, target: SeekTarget) -> Result<u64, ClientError> {
        let request = Request::Seek { topic: topic.into(), subscription: subscription.into(), target };
        match self.call(&request).await? {
            Response::Sought { offset } => Ok(offset),
            other => Err(refused_or_unexpected(other)),
        }
    }

    /// Deletes a subscription (refused while consumers are attached).
    pub async fn delete_subscription(&self, topic: &str, subscription: &str) -> Result<(), ClientError> {
        let request = Request::DeleteSubscription { topic: topic.into(), subscription: subscription.into() };
        match self.call(&request).await? {
            Response::SubscriptionDeleted => Ok(()),
            other => Err(refused_or_unexpected(other)),
        }
    }

    /// The node's kept conflicts (replicated messages whose id it held with another
    /// content), of one topic or of all.
    pub async fn list_conflicts(&self, topic: Option<&str>) -> Result<Vec<crate::protocol::KeptConflict>, ClientError> {
        match self.call(&Request::ListConflicts { topic: topic.map(Into::into) }).await? {
            Response::Conflicts(kept) => Ok(kept),
            other => Err(refused_or_unexpected(other)),
        }
    }

    /// Signs a catalogue edit as this client's principal, at `at_ms` (now, for an edit).
    pub fn sign(&self, body: rill_replication::access::Body, at_ms: u64) -> Result<Signed, ClientError> {
        let cert = &self.identity.chain[0];
        let by = match rill_transport::certs::holder(cert).map_err(ClientError::Identity)? {
            rill_transport::certs::Holder::Principal { name, superuser } => Signer { principal: name, superuser },
            rill_transport::certs::Holder::Node(name) => {
                return Err(ClientError::Identity(format!("'{name}' is a node certificate, not a client's")));
            }
        };
        let message = Signed::message(&body, &by, at_ms);
        let signature = rill_transport::certs::sign(&self.identity.key, &message).map_err(ClientError::Identity)?;
        Ok(Signed { body, by, at_ms, cert: cert.to_vec(), signature })
    }

    /// Creates or deletes a catalogue entry (a grant or a token); answers once it is
    /// durable on the node (it spreads to the mesh from there).
    pub async fn catalogue_edit(&self, signed: Signed) -> Result<(), ClientError> {
        match self.call(&Request::CatalogueEdit(signed)).await? {
            Response::CatalogueDone => Ok(()),
            other => Err(refused_or_unexpected(other)),
        }
    }

    /// Who this client is to the node, or whom `token` names: the name, whether a
    /// superuser, and the grants that count.
    pub async fn who_am_i(&self, token: Option<&str>) -> Result<(String, bool, Vec<String>), ClientError> {
        match self.call(&Request::WhoAmI { token: token.map(Into::into) }).await? {
            Response::Principal { name, superuser, grants } => Ok((name, superuser, grants)),
            other => Err(refused_or_unexpected(other)),
        }
    }

    /// Stores a blob on the node (a function's module), for a definition in `namespace`;
    /// answers its SHA-256 once it is durable.
    pub async fn put_blob(&self, namespace: &str, bytes: Vec<u8>) -> Result<[u8; 32], ClientError> {
        match self.call(&Request::PutBlob { namespace: namespace.into(), bytes }).await? {
            Response::BlobStored { hash } => Ok(hash),
            other => Err(refused_or_unexpected(other)),
        }
    }

    /// The namespace catalogue as the node sees it.
    pub async fn ns_get(&self) -> Result<rill_replication::namespace::ConfigDoc, ClientError> {
        match self.call(&Request::NsGet).await? {
            Response::Namespaces(doc) => Ok(doc),
            other => Err(refused_or_unexpected(other)),
        }
    }

    /// Opens a producer session on `topic` whose seqs it assigns: the node draws a new
    /// epoch, so this session's ids are new whatever the name did before (a message sent
    /// again by a new session is stored again: at least once). [`Producer::resume`] keeps
    /// the epoch across reconnects.
    pub async fn producer(&self, topic: &str, producer: String) -> Result<Producer, ClientError> {
        self.open_producer(topic, producer, SeqMode::Assigned).await
    }

    /// Opens a producer whose seqs the caller chooses ([`Outgoing::with_seq`], epoch 0):
    /// the caller guarantees that (producer, seq) names one message forever, so a resend
    /// after the caller itself restarted is stored once.
    pub async fn producer_with_seqs(&self, topic: &str, producer: String) -> Result<Producer, ClientError> {
        self.open_producer(topic, producer, SeqMode::Chosen).await
    }

    async fn open_producer(&self, topic: &str, producer: String, seqs: SeqMode) -> Result<Producer, ClientError> {
        let request = Request::OpenProducer { topic: topic.into(), producer: producer.clone(), seqs };
        let (epoch, next_seq) = match self.call(&request).await? {
            Response::ProducerOpened { epoch, next_seq } => (epoch, next_seq),
            other => return Err(refused_or_unexpected(other)),
        };
        let (send, recv) = self.open_stream().await?;
        Ok(Producer {
            topic: topic.into(),
            producer,
            epoch,
            seqs,
            next_seq,
            send,
            recv,
            in_flight: VecDeque::new(),
            buf: Vec::new(),
            reader: FrameReader::default(),
        })
    }

    /// Attaches to subscription `subscription` of `topic`; `start` applies only when the
    /// subscription is new.
    pub async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        start: StartPosition,
    ) -> Result<Consumer, ClientError> {
        self.subscribe_with(topic, subscription, start, ConsumerOptions::default()).await
    }

    /// [`Client::subscribe`] with a subscription type and redelivery policy.
    pub async fn subscribe_with(
        &self,
        topic: &str,
        subscription: &str,
        start: StartPosition,
        options: ConsumerOptions,
    ) -> Result<Consumer, ClientError> {
        let (mut send, mut recv) = self.open_stream().await?;
        let mut buf = Vec::new();
        let request = Request::Subscribe { topic: topic.into(), subscription: subscription.into(), start, options };
        frame::write_frame(&mut send, &request, &mut buf).await?;
        match frame::read_frame(&mut recv, CLIENT_FRAME_BYTES_MAX, &mut buf).await?.ok_or(ClientError::Closed)? {
            Response::Subscribed { start_offset } => Ok(Consumer {
                send,
                recv,
                start_offset,
                buffer: VecDeque::new(),
                acks: Vec::new(),
                nacks: Vec::new(),
                buf,
            }),
            other => Err(refused_or_unexpected(other)),
        }
    }
}

/// A message to produce. Its sequence number is assigned by the producer, or chosen by
/// the caller (`seq`): then the caller guarantees that (producer, seq) names this one
/// message forever, for example a line number of a file, so a resend after the caller
/// itself restarted carries the same id and is stored once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outgoing {
    /// The caller's sequence number; `None` to have the producer assign one. A batch is
    /// all one or all the other.
    pub seq: Option<u64>,
    /// Optional routing key.
    pub key: Option<Vec<u8>>,
    /// Application headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Outgoing {
    /// A message with only a payload.
    pub fn payload(payload: impl Into<Vec<u8>>) -> Self {
        Outgoing { payload: payload.into(), ..Default::default() }
    }

    /// The same message with the caller's sequence number.
    pub fn with_seq(self, seq: u64) -> Self {
        Outgoing { seq: Some(seq), ..self }
    }
}

/// A batch sent and not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    messages: Vec<NewMessage>,
    sent_at: Instant,
}

/// The node's answer to one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchAck {
    /// Sequence number of the batch's first message.
    pub first_seq: u64,
    /// Every message's sequence number, in order (caller-chosen ones need not be
    /// consecutive).
    pub seqs: Vec<u64>,
    /// One entry per message, in order.
    pub results: Vec<Produced>,
    /// When the batch was (last) sent.
    pub sent_at: Instant,
}

/// A pipelined producer on one topic. Batches are acknowledged in the order sent; every
/// unacknowledged batch is kept so that [`Producer::resume`] can resend it on a new
/// connection, where the node's dedup answers what was already stored.
#[derive(Debug)]
pub struct Producer {
    topic: String,
    producer: String,
    /// The session's epoch (0 with caller-chosen seqs).
    epoch: u64,
    seqs: SeqMode,
    next_seq: u64,
    send: SendStream,
    recv: RecvStream,
    in_flight: VecDeque<InFlight>,
    buf: Vec<u8>,
    /// Reads acks; keeps a partly read one across a cancelled `next_ack`.
    reader: FrameReader,
}

impl Producer {
    /// The producer id.
    pub fn id(&self) -> &str {
        &self.producer
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The session's epoch: 0 when the caller chooses seqs, else drawn by the node.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence numbers of the oldest batch in flight: the one
    /// [`Producer::next_ack`] answers next.
    pub fn oldest_in_flight(&self) -> Option<std::ops::Range<u64>> {
        let batch = self.in_flight.front()?;
        let first = batch.messages.first().map_or(self.next_seq, |m| m.seq);
        Some(first..first + batch.messages.len() as u64)
    }

    /// The sequence number the next message will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Batches sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends a batch without waiting for its acknowledgement; returns its first seq. Every
    /// message of a producer opened with [`Client::producer_with_seqs`] carries its seq,
    /// none of one opened with [`Client::producer`]; anything else (a mixed batch included)
    /// is refused before anything is sent.
    pub async fn send(&mut self, batch: Vec<Outgoing>) -> Result<u64, ClientError> {
        let explicit = batch.iter().filter(|m| m.seq.is_some()).count();
        match self.seqs {
            SeqMode::Assigned if explicit > 0 => {
                return Err(ClientError::Unexpected(format!(
                    "this producer assigns seqs, and {explicit} message(s) carry one; open a producer with \
                     producer_with_seqs to choose them"
                )));
            }
            SeqMode::Chosen if explicit < batch.len() => {
                return Err(ClientError::Unexpected(format!(
                    "this producer's seqs are chosen, and {} message(s) carry none",
                    batch.len() - explicit
                )));
            }
            _ => {}
        }
        if let Some(m) = batch.iter().find(|m| m.seq == Some(u64::MAX)) {
            return Err(ClientError::Unexpected(format!("seq {} is reserved", m.seq.unwrap_or_default())));
        }
        let first_assigned = self.next_seq;
        let messages: Vec<NewMessage> = batch
            .into_iter()
            .enumerate()
            .map(|(i, m)| NewMessage {
                seq: m.seq.unwrap_or(first_assigned + i as u64),
                key: m.key,
                headers: m.headers,
                payload: m.payload,
            })
            .collect();
        if self.seqs == SeqMode::Assigned {
            self.next_seq += messages.len() as u64;
        }
        let first_seq = messages.first().map_or(first_assigned, |m| m.seq);
        self.in_flight.push_back(InFlight { messages, sent_at: Instant::now() });
        let batch = self.in_flight.back().expect("just pushed");
        let request = Request::Produce {
            topic: self.topic.clone(),
            producer: self.producer.clone(),
            epoch: self.epoch,
            messages: batch.messages.clone(),
        };
        frame::write_frame(&mut self.send, &request, &mut self.buf).await?;
        Ok(first_seq)
    }

    /// Waits for the acknowledgement of the oldest batch in flight. A refusal drops that
    /// batch (it will not be resent) and is returned as an error. Cancel-safe: dropped
    /// before it is ready (in a `select!`), it loses nothing, and the next call answers the
    /// same batch.
    pub async fn next_ack(&mut self) -> Result<BatchAck, ClientError> {
        if self.in_flight.is_empty() {
            return Err(ClientError::Unexpected("next_ack with nothing in flight".into()));
        }
        let response = self.reader.read(&mut self.recv, CLIENT_FRAME_BYTES_MAX).await?.ok_or(ClientError::Closed)?;
        let batch =
            self.in_flight.front().ok_or_else(|| ClientError::Unexpected("an answer with nothing in flight".into()))?;
        let first_seq = batch.messages.first().map_or(self.next_seq, |m| m.seq);
        let sent_at = batch.sent_at;
        match response {
            Response::Produced(results) if results.len() == batch.messages.len() => {
                let seqs = batch.messages.iter().map(|m| m.seq).collect();
                self.in_flight.pop_front();
                Ok(BatchAck { first_seq, seqs, results, sent_at })
            }
            Response::Error { code, message } if !code.is_retriable() => {
                self.in_flight.pop_front();
                Err(ClientError::Refused { code, message })
            }
            other => Err(refused_or_unexpected(other)),
        }
    }

    /// Waits for every batch in flight.
    pub async fn flush(&mut self) -> Result<Vec<BatchAck>, ClientError> {
        let mut acks = Vec::with_capacity(self.in_flight.len());
        while !self.in_flight.is_empty() {
            acks.push(self.next_ack().await?);
        }
        Ok(acks)
    }

    /// Continues on a new connection: opens a new stream and resends every unacknowledged
    /// batch with its original sequence numbers, so nothing is lost or stored twice.
    pub async fn resume(&mut self, client: &Client) -> Result<(), ClientError> {
        let (send, recv) = client.open_stream().await?;
        self.send = send;
        self.recv = recv;
        self.reader = FrameReader::default();
        for batch in &mut self.in_flight {
            batch.sent_at = Instant::now();
            let request = Request::Produce {
                topic: self.topic.clone(),
                producer: self.producer.clone(),
                epoch: self.epoch,
                messages: batch.messages.clone(),
            };
            frame::write_frame(&mut self.send, &request, &mut self.buf).await?;
        }
        Ok(())
    }

    /// Finishes the stream after flushing.
    pub async fn close(mut self) -> Result<Vec<BatchAck>, ClientError> {
        let acks = self.flush().await?;
        let _ = self.send.finish();
        Ok(acks)
    }
}

/// A consumer attached to a subscription.
#[derive(Debug)]
pub struct Consumer {
    send: SendStream,
    recv: RecvStream,
    start_offset: u64,
    buffer: VecDeque<StoredMessage>,
    acks: Vec<u64>,
    nacks: Vec<u64>,
    buf: Vec<u8>,
}

impl Consumer {
    /// The offset deliveries started from.
    pub fn start_offset(&self) -> u64 {
        self.start_offset
    }

    /// Messages received and not yet returned by [`Consumer::next`].
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Acks recorded and not yet sent.
    pub fn pending_acks(&self) -> usize {
        self.acks.len()
    }

    /// The next message, waiting for one if needed; `None` when the node closed the
    /// subscription. Pending acks are sent before waiting.
    pub async fn next(&mut self) -> Result<Option<StoredMessage>, ClientError> {
        if self.buffer.is_empty() {
            self.flush_acks().await?;
            match frame::read_frame(&mut self.recv, CLIENT_FRAME_BYTES_MAX, &mut self.buf).await? {
                Some(Response::Deliver(messages)) => self.buffer.extend(messages),
                Some(other) => return Err(refused_or_unexpected(other)),
                None => return Ok(None),
            }
        }
        Ok(self.buffer.pop_front())
    }

    /// Records the ack of a delivered message; it is sent by the next
    /// [`Consumer::flush_acks`], or by [`Consumer::next`] before it waits for more.
    pub fn ack(&mut self, offset: u64) {
        self.acks.push(offset);
    }

    /// Records a negative ack: the message is delivered again after the consumer's nack
    /// delay. Sent like acks.
    pub fn nack(&mut self, offset: u64) {
        self.nacks.push(offset);
    }

    /// Acks every message up to and including `offset` (Exclusive and Failover
    /// subscriptions; others ignore it). Sends buffered acks first.
    pub async fn ack_cumulative(&mut self, offset: u64) -> Result<(), ClientError> {
        self.flush_acks().await?;
        frame::write_frame(&mut self.send, &Request::AckCumulative { offset }, &mut self.buf).await?;
        Ok(())
    }

    /// Sends buffered acks and nacks.
    pub async fn flush_acks(&mut self) -> Result<(), ClientError> {
        if !self.acks.is_empty() {
            let offsets = std::mem::take(&mut self.acks);
            frame::write_frame(&mut self.send, &Request::Ack { offsets }, &mut self.buf).await?;
        }
        if !self.nacks.is_empty() {
            let offsets = std::mem::take(&mut self.nacks);
            frame::write_frame(&mut self.send, &Request::Nack { offsets }, &mut self.buf).await?;
        }
        Ok(())
    }

    /// Sends pending acks and detaches. Returns once the node has ended the subscription
    /// stream, after which the subscription is free for another consumer. Messages still
    /// in flight are dropped here; unacked, they are delivered again later.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.flush_acks().await?;
        let _ = self.send.finish();
        while frame::read_frame::<_, Response>(&mut self.recv, CLIENT_FRAME_BYTES_MAX, &mut self.buf).await?.is_some() {
        }
        Ok(())
    }
}
