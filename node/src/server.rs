//! The client door: the accept loop, and the request conversations on client streams.
//! Peer connections are handed to the replication driver. With `consume.rs`, this is the
//! client edge, the one place errors become wire responses.
use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use quinn::{Endpoint, RecvStream, SendStream};
use rill_storage::{
    Message, MessageId, NamespaceName, NodeName, ProducerId, TopicName, message::PRODUCER_ID_BYTES_MAX,
    topic::OnConflict,
};
use rill_transport::{
    FrameError, certs, frame,
    net::{self, CloseCode},
    tls::{ALPN_CLIENT, ALPN_PEER},
};
use rustls::pki_types::CertificateDer;
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument;

use crate::{
    authz::{Authz, Principal},
    config::{LimitsConfig, NodeConfig},
    conflicts::Conflicts,
    consume,
    dispatch::Subscriptions,
    error::NodeError,
    mesh::{Change, MeshHandle},
    protocol::{ErrorCode, NewMessage, NodeStats, Request, Response, SeqMode},
    registry::Registry,
    retention::BacklogGate,
    stats,
    topic::{AppendReply, Topic},
};

/// Responses a produce stream may have pending (pipelined) before the node stops reading
/// it; with the QUIC stream window this bounds a producer's memory on the node.
const PIPELINE_REQUESTS_MAX: usize = 64;

/// The subsystems the server hands requests to.
pub(crate) struct Parts {
    pub(crate) registry: Arc<Registry>,
    pub(crate) subscriptions: Arc<Subscriptions>,
    pub(crate) conflicts: Arc<Conflicts>,
    pub(crate) backlog: Arc<BacklogGate>,
    pub(crate) mesh: MeshHandle,
    pub(crate) authz: Arc<Authz>,
    /// What the stream functions report.
    pub(crate) function_reports: Arc<crate::functions::driver::Reports>,
}

/// What every connection and stream of the client door shares.
pub(crate) struct Server {
    name: NodeName,
    /// The name as stamped on every message this node accepts (shared, not copied).
    origin: Arc<str>,
    /// The configured peers: a peer connection's certificate must name one.
    peers: Vec<NodeName>,
    limits: LimitsConfig,
    parts: Parts,
    started_ms: u64,
    /// Bytes of produce requests read and not yet answered (`produce_inflight_bytes_max`).
    produce_budget: Arc<Semaphore>,
    connections: AtomicU32,
}

impl Server {
    pub(crate) fn new(name: NodeName, config: &NodeConfig, parts: Parts) -> Server {
        Server {
            origin: name.as_str().into(),
            name,
            peers: config.peers.iter().map(|p| p.name.clone()).collect(),
            limits: config.limits.clone(),
            started_ms: parts.registry.env.clock.now_ms(),
            produce_budget: Arc::new(Semaphore::new(config.limits.produce_inflight_bytes_max as usize)),
            connections: AtomicU32::new(0),
            parts,
        }
    }

    fn registry(&self) -> &Registry {
        &self.parts.registry
    }
}

pub(crate) async fn accept_loop(server: Arc<Server>, endpoint: Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        if server.connections.load(Ordering::Relaxed) >= server.limits.connections_max {
            tracing::warn!(remote = %incoming.remote_address(), "refusing connection: connections_max reached");
            incoming.refuse();
            continue;
        }
        let server = Arc::clone(&server);
        tokio::spawn(
            async move {
                let remote = incoming.remote_address();
                server.connections.fetch_add(1, Ordering::Relaxed);
                match incoming.await {
                    Ok(conn) => serve_connection(Arc::clone(&server), conn).await,
                    Err(e) => tracing::info!(%remote, error = %e, "client handshake failed"),
                }
                server.connections.fetch_sub(1, Ordering::Relaxed);
            }
            .in_current_span(),
        );
    }
}

async fn serve_connection(server: Arc<Server>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    match net::negotiated_alpn(&conn).as_deref() {
        Some(ALPN_CLIENT) => {}
        Some(ALPN_PEER) => return attach_peer(&server, conn).await,
        _ => {
            conn.close(CloseCode::UnsupportedProtocol.into(), b"unsupported protocol");
            return;
        }
    }
    let cert = client_certificate(&conn);
    let who = match server.parts.authz.admit(cert.as_ref()) {
        Ok(who) => Arc::new(who),
        Err(why) => {
            tracing::warn!(%remote, %why, "refusing client connection");
            conn.close(CloseCode::Forbidden.into(), why.as_bytes());
            return;
        }
    };
    tracing::debug!(%remote, principal = %who.name, "client connected");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(Arc::clone(&server), Arc::clone(&who), send, recv).in_current_span());
            }
            Err(e) => {
                tracing::debug!(%remote, reason = %e, "client connection ended");
                return;
            }
        }
    }
}

/// The end-entity certificate the client presented (the CA vouched for it in the
/// handshake).
fn client_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let chain = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

/// Hands a peer connection to the replication driver if its certificate names a
/// configured peer (the CA already vouched for it during the handshake).
async fn attach_peer(server: &Server, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let names = server.peers.iter().map(NodeName::as_str);
    let matched = client_certificate(&conn).and_then(|cert| certs::matching_name(&cert, names));
    match server.peers.iter().find(|p| Some(p.as_str()) == matched) {
        Some(peer) => server.parts.mesh.attach(peer.clone(), conn).await,
        None => {
            tracing::warn!(%remote, "refusing peer link: its certificate names no configured peer");
            conn.close(CloseCode::NotConfigured.into(), b"not a configured peer");
        }
    }
}

fn frame_error(e: &FrameError) -> Response {
    let code = match e {
        FrameError::TooLarge { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::Malformed,
    };
    Response::Error { code, message: e.to_string() }
}

/// A response that may still be waiting for its group commit.
enum Pending {
    Ready(Response),
    /// The reply, and the share of the produce byte budget held until it is answered.
    Append(AppendReply, tokio::sync::OwnedSemaphorePermit),
}

impl From<Result<Response, NodeError>> for Pending {
    fn from(result: Result<Response, NodeError>) -> Pending {
        Pending::Ready(result.unwrap_or_else(Response::from))
    }
}

async fn serve_stream(server: Arc<Server>, who: Arc<Principal>, mut send: SendStream, mut recv: RecvStream) {
    let max = server.limits.frame_bytes_max;
    let mut buf = Vec::new();
    let first = match frame::read_frame::<_, Request>(&mut recv, max, &mut buf).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::info!(error = %e, "bad first frame on client stream");
            let _ = frame::write_frame(&mut send, &frame_error(&e), &mut buf).await;
            let _ = send.finish();
            return;
        }
    };
    if let Request::Subscribe { .. } = &first
        && let Err(e) = server.parts.authz.check(&who, &first, None)
    {
        let _ = frame::write_frame(&mut send, &Response::from(e), &mut buf).await;
        let _ = send.finish();
        return;
    }
    if let Request::Subscribe { topic, subscription, start, options } = first {
        let request = consume::Subscribe { topic, subscription, start, options };
        let subs = Arc::clone(&server.parts.subscriptions);
        let consumer = consume::Consumer { who, authz: Arc::clone(&server.parts.authz) };
        consume::serve(subs, consumer, max, request, send, recv).await;
        return;
    }
    let (tx, rx) = mpsc::channel(PIPELINE_REQUESTS_MAX);
    let reader = read_requests(&server, &who, first, buf.len(), recv, tx);
    let writer = write_responses(send, rx);
    tokio::join!(reader, writer);
}

/// Reads requests in order and queues their (possibly pending) responses.
async fn read_requests(
    server: &Server,
    who: &Principal,
    first: Request,
    first_bytes: usize,
    mut recv: RecvStream,
    tx: mpsc::Sender<Pending>,
) {
    let max = server.limits.frame_bytes_max;
    let mut buf = Vec::new();
    let mut next = Some(first);
    let mut request_bytes = first_bytes;
    while let Some(request) = next.take() {
        let pending = match server.parts.authz.check(who, &request, None) {
            Ok(()) => handle_request(server, who, request, request_bytes).await,
            Err(e) => Err(e).into(),
        };
        if tx.send(pending).await.is_err() {
            return;
        }
        next = match frame::read_frame::<_, Request>(&mut recv, max, &mut buf).await {
            Ok(r) => {
                request_bytes = buf.len();
                r
            }
            Err(FrameError::Io(e)) => {
                tracing::debug!(error = %e, "client stream ended");
                None
            }
            Err(e) => {
                tracing::info!(error = %e, "bad frame on client stream; closing the stream");
                let _ = tx.send(Pending::Ready(frame_error(&e))).await;
                let _ = recv.stop(CloseCode::BadFrame.into());
                None
            }
        };
    }
}

/// Writes responses in request order, waiting for each pending group commit.
async fn write_responses(mut send: SendStream, mut rx: mpsc::Receiver<Pending>) {
    let mut buf = Vec::new();
    while let Some(pending) = rx.recv().await {
        let response = match pending {
            Pending::Ready(r) => r,
            Pending::Append(reply, _budget) => match reply.await {
                Ok(appended) => match appended.result {
                    Ok(outcomes) => Response::Produced(outcomes.into_iter().map(Into::into).collect()),
                    Err(e) => NodeError::from(e).into(),
                },
                Err(_) => {
                    Response::Error { code: ErrorCode::Storage, message: "the write was abandoned; retry".into() }
                }
            },
        };
        if frame::write_frame(&mut send, &response, &mut buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// Does what a request asks; [`Authz::check`] has allowed it.
async fn handle_request(server: &Server, who: &Principal, request: Request, request_bytes: usize) -> Pending {
    let subs = &server.parts.subscriptions;
    let authz = &server.parts.authz;
    match request {
        Request::Produce { topic, producer, epoch, messages } => {
            produce(server, who, &topic, (producer, epoch), messages, request_bytes).await
        }
        Request::OpenProducer { topic, producer, seqs } => {
            open_producer(server, who, &topic, &producer, seqs).await.into()
        }
        Request::ListTopics => Ok(Response::Topics(topic_stats(server, who).await)).into(),
        Request::Stats => Ok(Response::Stats(node_stats(server, who).await)).into(),
        Request::NsEdit { namespace, edit } => ns_edit(server, &namespace, edit).await.into(),
        Request::NsGet => Ok(Response::Namespaces(authz.view(who, server.parts.mesh.config().await))).into(),
        Request::CatalogueEdit(signed) => {
            server.parts.mesh.edit(Change::Entry(Box::new(signed))).await.map(|()| Response::CatalogueDone).into()
        }
        Request::WhoAmI { token } => who_am_i(server, who, token.as_deref()).into(),
        Request::PutBlob { bytes, .. } => put_blob(server, bytes).await.into(),
        Request::Seek { topic, subscription, target } => {
            consume::seek(subs, &topic, &subscription, target).await.into()
        }
        Request::DeleteSubscription { topic, subscription } => {
            consume::delete(subs, &topic, &subscription).await.into()
        }
        Request::ListConflicts { topic } => list_conflicts(server, who, topic.as_deref()).into(),
        Request::Subscribe { .. } => {
            Err(NodeError::Malformed("Subscribe must be the first frame of its own stream".into())).into()
        }
        Request::Ack { .. } | Request::AckCumulative { .. } | Request::Nack { .. } => {
            Err(NodeError::Malformed("acks and nacks are only valid on a subscription stream".into())).into()
        }
    }
}

/// True when `who` may see topic `name` (by its string form) in lists and statistics.
fn sees_topic(server: &Server, who: &Principal, name: &str) -> bool {
    TopicName::parse(name).is_ok_and(|t| server.parts.authz.sees(who, &t.namespace_name()))
}

/// Statistics of every topic `who` may see (reads the log: off the async threads).
async fn topic_stats(server: &Server, who: &Principal) -> Vec<crate::protocol::TopicStats> {
    let subs = Arc::clone(&server.parts.subscriptions);
    let mut topics = server.registry().env.run_blocking(move || stats::topics(&subs)).await;
    topics.retain(|t| sees_topic(server, who, &t.topic));
    topics
}

async fn node_stats(server: &Server, who: &Principal) -> NodeStats {
    let now_ms = server.registry().env.clock.now_ms();
    let mut peers = server.parts.mesh.stats().await;
    for p in &mut peers {
        p.lanes.retain(|l| sees_topic(server, who, &l.topic));
    }
    let (reports, authz, viewer) =
        (Arc::clone(&server.parts.function_reports), Arc::clone(&server.parts.authz), who.clone());
    let functions = server
        .registry()
        .env
        .run_blocking(move || {
            reports.stats(now_ms, |name| {
                let ns = name.rsplit_once('/').and_then(|(ns, _)| NamespaceName::parse(ns).ok());
                ns.is_some_and(|ns| authz.sees(&viewer, &ns))
            })
        })
        .await;
    NodeStats {
        node: server.name.to_string(),
        functions,
        uptime_ms: now_ms.saturating_sub(server.started_ms),
        now_ms,
        topics: topic_stats(server, who).await,
        peers,
        refusals: server.parts.authz.refusals(who),
        entries_refused: server.parts.authz.entries_refused(),
    }
}

/// Stores a blob durably (blocking work: it syncs).
async fn put_blob(server: &Server, bytes: Vec<u8>) -> Result<Response, NodeError> {
    let registry = Arc::clone(&server.parts.registry);
    let hash = server.registry().env.run_blocking(move || registry.blobs.put(&bytes)).await?;
    server.parts.mesh.blob_stored(hash).await;
    Ok(Response::BlobStored { hash })
}

fn who_am_i(server: &Server, who: &Principal, token: Option<&str>) -> Result<Response, NodeError> {
    let who = match token {
        Some(token) => &server.parts.authz.token(token, server.registry().env.clock.now_ms())?,
        None => who,
    };
    let grants = server.parts.authz.grants_of(who);
    Ok(Response::Principal { name: who.name.to_string(), superuser: who.superuser, grants })
}

async fn ns_edit(
    server: &Server,
    namespace: &str,
    edit: rill_replication::namespace::Edit,
) -> Result<Response, NodeError> {
    let namespace = NamespaceName::parse(namespace).map_err(|e| NodeError::Namespace(e.to_string()))?;
    server.parts.mesh.edit(Change::Namespace(namespace, edit)).await?;
    Ok(Response::NsDone)
}

fn list_conflicts(server: &Server, who: &Principal, topic: Option<&str>) -> Result<Response, NodeError> {
    let topic = topic.map(TopicName::parse).transpose()?;
    let mut kept = server.parts.conflicts.list(topic.as_ref())?;
    kept.retain(|k| sees_topic(server, who, &k.topic));
    Ok(Response::Conflicts(kept))
}

/// The producer id a client's producer name is stored under: `principal/name`, so one
/// principal cannot take another's ids (DESIGN section 2). A superuser acts for the mesh
/// and names producers as it likes.
fn check_producer(who: &Principal, producer: &str) -> Result<ProducerId, NodeError> {
    let scoped = if who.superuser { producer.len() } else { who.name.len() + 1 + producer.len() };
    if producer.is_empty() || scoped > PRODUCER_ID_BYTES_MAX {
        let why = format!("producer id must be 1..={PRODUCER_ID_BYTES_MAX} bytes (with the principal's name and '/')");
        return Err(NodeError::InvalidName(why));
    }
    // Operators and bridges write under `$fn/...`, `$infer/...`, `$kafka/...` with ids
    // derived from their inputs; a client must never be able to take those ids.
    if producer.starts_with('$') {
        let why = format!("producer '{producer}': names starting with '$' are reserved for operators and bridges");
        return Err(NodeError::InvalidName(why));
    }
    if who.superuser {
        return Ok(ProducerId(producer.into()));
    }
    Ok(ProducerId(format!("{}/{producer}", who.name).into()))
}

async fn open_producer(
    server: &Server,
    who: &Principal,
    topic: &str,
    producer: &str,
    seqs: SeqMode,
) -> Result<Response, NodeError> {
    let name = TopicName::parse(topic)?;
    let producer = check_producer(who, producer)?;
    let topic = server.registry().topic(&name).await?;
    let env = &server.registry().env;
    Ok(match seqs {
        // Injected bug, wave 1's scheme: one id space per producer, continued after the
        // highest seq held.
        SeqMode::Assigned if env.bugs.shared_epoch => {
            Response::ProducerOpened { epoch: 1, next_seq: topic.next_seq(&producer, 1) }
        }
        // 64 random bits per session: two sessions of one producer share an epoch with
        // odds of about n^2 / 2^65 for n sessions; 0 is the caller-chosen space.
        SeqMode::Assigned => Response::ProducerOpened { epoch: env.random.next_u64().max(1), next_seq: 0 },
        SeqMode::Chosen => Response::ProducerOpened { epoch: 0, next_seq: topic.next_seq(&producer, 0) },
    })
}

async fn produce(
    server: &Server,
    who: &Principal,
    topic: &str,
    producer: (String, u64),
    messages: Vec<NewMessage>,
    request_bytes: usize,
) -> Pending {
    // Wait for budget before queueing: while it is used up, this stream is not read and
    // QUIC flow control pushes back on the producer.
    let bytes = request_bytes.clamp(1, server.limits.produce_inflight_bytes_max as usize) as u32;
    let Ok(budget) = Arc::clone(&server.produce_budget).acquire_many_owned(bytes).await else {
        return Err(NodeError::ShuttingDown("node is shutting down")).into();
    };
    match prepare_produce(server, who, topic, producer, messages).await {
        Ok((topic, messages)) => match topic.append(messages, OnConflict::Refuse).await {
            Some(reply) => Pending::Append(reply, budget),
            None => Err(NodeError::ShuttingDown("the topic is closing")).into(),
        },
        Err(e) => Err(e).into(),
    }
}

/// Validates a produce request as a whole and stamps its messages.
async fn prepare_produce(
    server: &Server,
    who: &Principal,
    topic: &str,
    (producer, epoch): (String, u64),
    messages: Vec<NewMessage>,
) -> Result<(Arc<Topic>, Vec<Message>), NodeError> {
    if server.registry().is_closing() {
        return Err(NodeError::ShuttingDown("node is shutting down"));
    }
    let name = TopicName::parse(topic)?;
    if let Some(why) = server.parts.backlog.refusal(&name.namespace_name()) {
        return Err(NodeError::BacklogFull(why));
    }
    let producer = check_producer(who, &producer)?;
    let limit = server.limits.message_bytes_max as usize;
    let now_ms = server.registry().env.clock.now_ms();
    let mut stamped = Vec::with_capacity(messages.len());
    for m in messages {
        if m.seq == u64::MAX {
            return Err(NodeError::Malformed(format!("seq {} is reserved", u64::MAX)));
        }
        let message = Message {
            id: MessageId { producer: producer.clone(), epoch, seq: m.seq },
            origin: Arc::clone(&server.origin),
            publish_time_ms: now_ms,
            key: m.key,
            headers: m.headers,
            payload: m.payload,
        };
        let size = message.size_bytes();
        if size > limit {
            return Err(NodeError::TooLarge(format!(
                "message seq {} is {size} bytes, more than message_bytes_max {limit}; nothing in this batch was stored",
                m.seq
            )));
        }
        stamped.push(message);
    }
    let topic = server.registry().topic(&name).await?;
    Ok((topic, stamped))
}
