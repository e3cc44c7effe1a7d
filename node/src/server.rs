//! The node: start-up (data dir, certificates, metadata, topics, endpoint), the accept
//! loop, and the request conversations on client streams.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use quinn::{Endpoint, RecvStream, SendStream};
use rill_storage::{
    Message, MessageId, ProducerId, StorageError, TopicName,
    fs::FileSystem,
    log::LogConfig,
    message::PRODUCER_ID_BYTES_MAX,
    meta::MetaStore,
    store::{self, TOPICS_DIR},
    topic::{OnConflict, TopicStore},
};
use rill_transport::{
    FrameError,
    certs::{self, Identity},
    frame, net,
    tls::{self, ALPN_CLIENT, ALPN_PEER},
};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::{
    config::NodeConfig,
    consume,
    env::Env,
    mesh::{self, MeshHandle},
    protocol::{ErrorCode, NewMessage, NodeStats, Request, Response, SeqMode, TopicStats},
    topic::{AppendReply, Growth, Topic},
};

/// Responses a produce stream may have pending (pipelined) before the node stops reading
/// it; with the QUIC stream window this bounds a producer's memory on the node.
const PIPELINE_REQUESTS_MAX: usize = 64;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data directory cannot be used.
    #[error("data dir {path} is not usable: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Certificates could not be made or loaded.
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The log or metadata could not be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// State shared by every task of a node.
pub(crate) struct Shared {
    pub(crate) name: String,
    /// The name as stamped on every message this node accepts (shared, not copied).
    origin: Arc<str>,
    pub(crate) config: NodeConfig,
    pub(crate) env: Env,
    pub(crate) meta: Arc<dyn MetaStore>,
    topics_root: PathBuf,
    topics: RwLock<BTreeMap<TopicName, Arc<Topic>>>,
    /// Topics that failed to open at start-up, with the reason; they stay unavailable
    /// until an operator repairs them and restarts the node.
    unavailable: BTreeMap<TopicName, String>,
    create_lock: tokio::sync::Mutex<()>,
    /// The subscriptions' dispatchers.
    pub(crate) subscriptions: crate::dispatch::Registry,
    /// Replicated contents that lost a conflict on this node.
    pub(crate) conflicts: crate::conflicts::Conflicts,
    /// Namespaces whose backlog quota is full with `on_full = reject`.
    pub(crate) backlog_full: Mutex<BTreeMap<String, String>>,
    started_ms: u64,
    /// Topics whose durable end moved, for the replication driver.
    pub(crate) growth: Arc<Growth>,
    /// The replication driver.
    pub(crate) mesh: MeshHandle,
    /// Bytes of produce requests read and not yet answered (`produce_inflight_bytes_max`).
    produce_budget: Arc<tokio::sync::Semaphore>,
    shutting_down: AtomicBool,
    connections: AtomicU32,
}

/// A running node.
pub struct Node {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    local_addr: SocketAddr,
}

fn data_dir_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::DataDir { path: path.to_path_buf(), source }
}

/// Fails early, with the directory's name, when the data dir cannot take writes.
fn check_data_dir(fs: &dyn FileSystem, dir: &std::path::Path) -> Result<(), StartError> {
    // Durably: a data dir whose entry a power cut drops takes everything in it along.
    rill_storage::fs::create_dir_durably(fs, dir).map_err(|e| match e {
        StorageError::Io { source, .. } => data_dir_error(dir)(source),
        other => data_dir_error(dir)(std::io::Error::other(other.to_string())),
    })?;
    let probe = dir.join(".rill-write-check");
    let file = fs.open(&probe, true).map_err(data_dir_error(dir))?;
    file.write_all_at(b"ok", 0).and_then(|()| file.sync_data()).map_err(data_dir_error(dir))?;
    fs.remove_file(&probe).map_err(data_dir_error(dir))
}

fn load_identity(config: &NodeConfig, name: &str) -> Result<Identity, StartError> {
    Ok(match (&config.tls.ca, &config.tls.cert, &config.tls.key) {
        (Some(ca), Some(cert), Some(key)) => Identity { ca: ca.clone(), cert: cert.clone(), key: key.clone() },
        _ => certs::ensure_dev_certs(&config.dev_certs_dir(), name)?,
    })
}

impl Node {
    /// Starts a node: checks the config and data dir, makes dev certificates if needed,
    /// opens metadata and every topic (recovering their logs), and listens.
    pub async fn start(config: NodeConfig, env: Env) -> Result<Node, StartError> {
        config.validate()?;
        let name = config.node_name();
        check_data_dir(env.fs.as_ref(), &config.data_dir)?;
        let identity = load_identity(&config, &name)?.load()?;
        let limits = net::Limits::default();
        let tls = tls::server_config(&identity, env.net.tls_time(), &[ALPN_CLIENT, ALPN_PEER])?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls));
        server.transport_config(limits.transport_config());
        let mut peer_client =
            quinn::ClientConfig::new(Arc::new(tls::client_config(&identity, env.net.tls_time(), ALPN_PEER)?));
        peer_client.transport_config(net::Limits::peer().transport_config());
        let growth = Arc::new(Growth::default());

        let meta = env.meta.open(&config.data_dir)?;
        let topics_root = config.data_dir.join(TOPICS_DIR);
        let log_config = log_config(&config);
        let mut topics = BTreeMap::new();
        let mut unavailable = BTreeMap::new();
        for (name, opened) in store::open_all(&env.fs, meta.as_ref(), &topics_root, log_config)? {
            match opened {
                Ok(store) => {
                    let s = &config.storage;
                    let topic = Topic::start(
                        store,
                        env.clone(),
                        Arc::clone(&growth),
                        s.produce_queue_requests_max,
                        s.group_commit_requests_max,
                    );
                    topics.insert(name, topic);
                }
                Err(e) => {
                    tracing::error!(topic = %name, error = %e, "topic unavailable; serving the others");
                    unavailable.insert(name, e.to_string());
                }
            }
        }
        let topic_count = topics.len();

        let endpoint = net::endpoint(env.net.as_ref(), config.listen, Some(server))
            .await
            .map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let local_addr = endpoint.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let (mesh_handle, mesh_events) = MeshHandle::new();
        let shared = Arc::new(Shared {
            name: name.clone(),
            origin: name.as_str().into(),
            started_ms: env.clock.now_ms(),
            growth,
            mesh: mesh_handle.clone(),
            produce_budget: Arc::new(tokio::sync::Semaphore::new(config.limits.produce_inflight_bytes_max as usize)),
            conflicts: crate::conflicts::Conflicts::new(Arc::clone(&meta), env.clone()),
            config,
            env,
            meta,
            topics_root,
            topics: RwLock::new(topics),
            unavailable,
            create_lock: tokio::sync::Mutex::new(()),
            subscriptions: crate::dispatch::Registry::default(),
            backlog_full: Mutex::new(BTreeMap::new()),
            shutting_down: AtomicBool::new(false),
            connections: AtomicU32::new(0),
        });
        let span = tracing::info_span!("node", name = %name);
        span.in_scope(|| mesh::start(Arc::clone(&shared), endpoint.clone(), peer_client, &mesh_handle, mesh_events))?;
        tokio::spawn(accept_loop(Arc::clone(&shared), endpoint.clone()).instrument(span.clone()));
        tokio::spawn(checkpoint_loop(Arc::clone(&shared)).instrument(span.clone()));
        tokio::spawn(crate::retention::run(Arc::clone(&shared)).instrument(span.clone()));
        span.in_scope(|| tracing::info!(%local_addr, topics = topic_count, "node listening"));
        Ok(Node { shared, endpoint, local_addr })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Stops accepting work, closes connections, and saves metadata.
    pub async fn shutdown(self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        self.endpoint.close(0u32.into(), b"node shutting down");
        checkpoint_all(&self.shared).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        tracing::info!(node = %self.shared.name, "node stopped");
    }
}

fn log_config(config: &NodeConfig) -> LogConfig {
    LogConfig {
        segment_bytes_max: config.storage.segment_bytes_max,
        index_interval_bytes: config.storage.index_interval_bytes,
    }
}

impl Shared {
    /// The topic, opened or created on first use.
    pub(crate) async fn topic(&self, name: &TopicName) -> Result<Arc<Topic>, StorageError> {
        if let Some(t) = self.topics.read().expect("topics lock poisoned").get(name) {
            return Ok(Arc::clone(t));
        }
        if let Some(reason) = self.unavailable.get(name) {
            return Err(StorageError::Unavailable { topic: name.to_string(), reason: reason.clone() });
        }
        let _creating = self.create_lock.lock().await;
        if let Some(t) = self.topics.read().expect("topics lock poisoned").get(name) {
            return Ok(Arc::clone(t));
        }
        let (fs, meta, root, name2, cfg) = (
            Arc::clone(&self.env.fs),
            Arc::clone(&self.meta),
            self.topics_root.clone(),
            name.clone(),
            log_config(&self.config),
        );
        let store = self.env.run_blocking(move || TopicStore::open(fs, meta.as_ref(), &root, name2, cfg)).await?;
        tracing::info!(topic = %name, "created topic");
        let s = &self.config.storage;
        let growth = Arc::clone(&self.growth);
        let topic =
            Topic::start(store, self.env.clone(), growth, s.produce_queue_requests_max, s.group_commit_requests_max);
        self.topics.write().expect("topics lock poisoned").insert(name.clone(), Arc::clone(&topic));
        Ok(topic)
    }

    /// The topic if it is open (never creates one).
    pub(crate) fn topic_if_open(&self, name: &TopicName) -> Option<Arc<Topic>> {
        self.topics.read().expect("topics lock poisoned").get(name).cloned()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    pub(crate) fn topic_list(&self) -> Vec<Arc<Topic>> {
        self.topics.read().expect("topics lock poisoned").values().cloned().collect()
    }
}

async fn accept_loop(shared: Arc<Shared>, endpoint: Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        if shared.connections.load(Ordering::Relaxed) >= shared.config.limits.connections_max {
            tracing::warn!(remote = %incoming.remote_address(), "refusing connection: connections_max reached");
            incoming.refuse();
            continue;
        }
        let shared = Arc::clone(&shared);
        tokio::spawn(
            async move {
                let remote = incoming.remote_address();
                shared.connections.fetch_add(1, Ordering::Relaxed);
                match incoming.await {
                    Ok(conn) => serve_connection(Arc::clone(&shared), conn).await,
                    Err(e) => tracing::info!(%remote, error = %e, "client handshake failed"),
                }
                shared.connections.fetch_sub(1, Ordering::Relaxed);
            }
            .in_current_span(),
        );
    }
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    match net::negotiated_alpn(&conn).as_deref() {
        Some(ALPN_CLIENT) => {}
        Some(ALPN_PEER) => return attach_peer(&shared, conn).await,
        _ => {
            conn.close(1u32.into(), b"unsupported protocol");
            return;
        }
    }
    tracing::debug!(%remote, "client connected");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(Arc::clone(&shared), send, recv).in_current_span());
            }
            Err(e) => {
                tracing::debug!(%remote, reason = %e, "client connection ended");
                return;
            }
        }
    }
}

/// Hands a peer connection to the replication driver if its certificate names a
/// configured peer (the CA already vouched for it during the handshake).
async fn attach_peer(shared: &Shared, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let certs =
        conn.peer_identity().and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok());
    let names = shared.config.peers.iter().map(|p| p.name.as_str());
    let peer = certs.as_ref().and_then(|c| c.first()).and_then(|cert| certs::matching_name(cert, names));
    match peer {
        Some(name) => shared.mesh.attach(name.to_string(), conn).await,
        None => {
            tracing::warn!(%remote, "refusing peer link: its certificate names no configured peer");
            conn.close(2u32.into(), b"not a configured peer");
        }
    }
}

pub(crate) fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: message.into() }
}

fn frame_error(e: &FrameError) -> Response {
    let code = match e {
        FrameError::TooLarge { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::Malformed,
    };
    error(code, e.to_string())
}

pub(crate) fn storage_error(e: &StorageError) -> Response {
    let code = match e {
        StorageError::Conflict { .. } => ErrorCode::Conflict,
        StorageError::Expired { .. } => ErrorCode::Expired,
        e if e.is_disk_full() => ErrorCode::DiskFull,
        _ => ErrorCode::Storage,
    };
    error(code, e.to_string())
}

/// A response that may still be waiting for its group commit.
enum Pending {
    Ready(Response),
    /// The reply, and the share of the produce byte budget held until it is answered.
    Append(AppendReply, tokio::sync::OwnedSemaphorePermit),
}

async fn serve_stream(shared: Arc<Shared>, mut send: SendStream, mut recv: RecvStream) {
    let max = shared.config.limits.frame_bytes_max;
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
    if let Request::Subscribe { topic, subscription, start, options } = first {
        consume::serve(shared, topic, subscription, start, options, send, recv).await;
        return;
    }
    let (tx, rx) = mpsc::channel(PIPELINE_REQUESTS_MAX);
    let reader = read_requests(&shared, first, buf.len(), recv, tx);
    let writer = write_responses(send, rx);
    tokio::join!(reader, writer);
}

/// Reads requests in order and queues their (possibly pending) responses.
async fn read_requests(
    shared: &Arc<Shared>,
    first: Request,
    first_bytes: usize,
    mut recv: RecvStream,
    tx: mpsc::Sender<Pending>,
) {
    let max = shared.config.limits.frame_bytes_max;
    let mut buf = Vec::new();
    let mut next = Some(first);
    let mut request_bytes = first_bytes;
    while let Some(request) = next.take() {
        let pending = handle_request(shared, request, request_bytes).await;
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
                let _ = recv.stop(1u32.into());
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
                    Err(e) => storage_error(&e),
                },
                Err(_) => error(ErrorCode::Storage, "the write was abandoned; retry"),
            },
        };
        if frame::write_frame(&mut send, &response, &mut buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn handle_request(shared: &Arc<Shared>, request: Request, request_bytes: usize) -> Pending {
    match request {
        Request::Produce { topic, producer, epoch, messages } => {
            produce(shared, &topic, (producer, epoch), messages, request_bytes).await
        }
        Request::OpenProducer { topic, producer, seqs } => {
            Pending::Ready(open_producer(shared, &topic, producer, seqs).await)
        }
        Request::ListTopics => Pending::Ready(Response::Topics(topic_stats(shared))),
        Request::Stats => Pending::Ready(Response::Stats(NodeStats {
            node: shared.name.clone(),
            uptime_ms: shared.env.clock.now_ms().saturating_sub(shared.started_ms),
            now_ms: shared.env.clock.now_ms(),
            topics: topic_stats(shared),
            peers: shared.mesh.stats().await,
        })),
        Request::NsEdit { namespace, edit } => Pending::Ready(match shared.mesh.edit(namespace, edit).await {
            Ok(()) => Response::NsDone,
            Err(message) => error(ErrorCode::Namespace, message),
        }),
        Request::NsGet => Pending::Ready(Response::Namespaces(shared.mesh.config().await)),
        Request::Seek { topic, subscription, target } => {
            Pending::Ready(consume::seek(shared, &topic, &subscription, target).await.unwrap_or_else(|e| e))
        }
        Request::DeleteSubscription { topic, subscription } => {
            Pending::Ready(consume::delete(shared, &topic, &subscription).await.unwrap_or_else(|e| e))
        }
        Request::ListConflicts { topic } => Pending::Ready(list_conflicts(shared, topic.as_deref())),
        Request::Subscribe { .. } => {
            Pending::Ready(error(ErrorCode::Malformed, "Subscribe must be the first frame of its own stream"))
        }
        Request::Ack { .. } | Request::AckCumulative { .. } | Request::Nack { .. } => {
            Pending::Ready(error(ErrorCode::Malformed, "acks and nacks are only valid on a subscription stream"))
        }
    }
}

fn list_conflicts(shared: &Shared, topic: Option<&str>) -> Response {
    let topic = match topic.map(parse_topic).transpose() {
        Ok(t) => t,
        Err(response) => return response,
    };
    match shared.conflicts.list(topic.as_ref()) {
        Ok(kept) => Response::Conflicts(kept),
        Err(e) => storage_error(&e),
    }
}

pub(crate) fn parse_topic(topic: &str) -> Result<TopicName, Response> {
    TopicName::parse(topic).map_err(|e| error(ErrorCode::InvalidName, e.to_string()))
}

fn check_producer(producer: &str) -> Result<ProducerId, Response> {
    if producer.is_empty() || producer.len() > PRODUCER_ID_BYTES_MAX {
        return Err(error(ErrorCode::InvalidName, format!("producer id must be 1..={PRODUCER_ID_BYTES_MAX} bytes")));
    }
    // Operators and bridges write under `$fn/...`, `$infer/...`, `$kafka/...` with ids
    // derived from their inputs; a client must never be able to take those ids.
    if producer.starts_with('$') {
        let why = format!("producer '{producer}': names starting with '$' are reserved for operators and bridges");
        return Err(error(ErrorCode::InvalidName, why));
    }
    Ok(ProducerId(producer.into()))
}

async fn open_producer(shared: &Shared, topic: &str, producer: String, seqs: SeqMode) -> Response {
    let (name, producer) = match (parse_topic(topic), check_producer(&producer)) {
        (Ok(n), Ok(p)) => (n, p),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let topic = match shared.topic(&name).await {
        Ok(t) => t,
        Err(e) => return storage_error(&e),
    };
    match seqs {
        // Injected bug, wave 1's scheme: one id space per producer, continued after the
        // highest seq held.
        SeqMode::Assigned if shared.env.bugs.shared_epoch => Response::ProducerOpened {
            epoch: 1,
            next_seq: topic.store.lock().expect("topic lock poisoned").dedup().next_seq(&producer, 1),
        },
        // 64 random bits per session: two sessions of one producer share an epoch with
        // odds of about n^2 / 2^65 for n sessions; 0 is the caller-chosen space.
        SeqMode::Assigned => Response::ProducerOpened { epoch: shared.env.random.next_u64().max(1), next_seq: 0 },
        SeqMode::Chosen => Response::ProducerOpened {
            epoch: 0,
            next_seq: topic.store.lock().expect("topic lock poisoned").dedup().next_seq(&producer, 0),
        },
    }
}

async fn produce(
    shared: &Shared,
    topic: &str,
    producer: (String, u64),
    messages: Vec<NewMessage>,
    request_bytes: usize,
) -> Pending {
    // Wait for budget before queueing: while it is used up, this stream is not read and
    // QUIC flow control pushes back on the producer.
    let bytes = request_bytes.clamp(1, shared.config.limits.produce_inflight_bytes_max as usize) as u32;
    let Ok(budget) = Arc::clone(&shared.produce_budget).acquire_many_owned(bytes).await else {
        return Pending::Ready(error(ErrorCode::ShuttingDown, "node is shutting down"));
    };
    match prepare_produce(shared, topic, producer, messages).await {
        Ok((topic, messages)) => match topic.append(messages, OnConflict::Refuse).await {
            Some(reply) => Pending::Append(reply, budget),
            None => Pending::Ready(error(ErrorCode::ShuttingDown, "the topic is closing")),
        },
        Err(response) => Pending::Ready(response),
    }
}

/// Validates a produce request as a whole and stamps its messages.
async fn prepare_produce(
    shared: &Shared,
    topic: &str,
    (producer, epoch): (String, u64),
    messages: Vec<NewMessage>,
) -> Result<(Arc<Topic>, Vec<Message>), Response> {
    if shared.shutting_down.load(Ordering::Relaxed) {
        return Err(error(ErrorCode::ShuttingDown, "node is shutting down"));
    }
    let name = parse_topic(topic)?;
    let namespace = format!("{}/{}", name.tenant(), name.namespace());
    if let Some(why) = shared.backlog_full.lock().expect("backlog lock poisoned").get(&namespace) {
        return Err(error(ErrorCode::BacklogFull, why.clone()));
    }
    let producer = check_producer(&producer)?;
    let limit = shared.config.limits.message_bytes_max as usize;
    let now_ms = shared.env.clock.now_ms();
    let mut stamped = Vec::with_capacity(messages.len());
    for m in messages {
        if m.seq == u64::MAX {
            return Err(error(ErrorCode::Malformed, format!("seq {} is reserved", u64::MAX)));
        }
        let message = Message {
            id: MessageId { producer: producer.clone(), epoch, seq: m.seq },
            origin: Arc::clone(&shared.origin),
            publish_time_ms: now_ms,
            key: m.key,
            headers: m.headers,
            payload: m.payload,
        };
        let size = message.size_bytes();
        if size > limit {
            return Err(error(
                ErrorCode::TooLarge,
                format!(
                    "message seq {} is {size} bytes, more than message_bytes_max {limit}; nothing in this batch was stored",
                    m.seq
                ),
            ));
        }
        stamped.push(message);
    }
    let topic = shared.topic(&name).await.map_err(|e| storage_error(&e))?;
    Ok((topic, stamped))
}

/// Statistics of every topic, the unavailable ones included with their error.
fn topic_stats(shared: &Shared) -> Vec<TopicStats> {
    let mut stats: Vec<TopicStats> = shared.topic_list().iter().map(|t| consume::topic_stats(shared, t)).collect();
    stats.extend(shared.unavailable.iter().map(|(name, reason)| TopicStats {
        topic: name.to_string(),
        start_offset: 0,
        end_offset: 0,
        bytes: 0,
        segments: 0,
        producers: 0,
        messages_in: 0,
        duplicates: 0,
        conflicts_refused: 0,
        conflicts_kept: 0,
        expired: 0,
        dedup_sessions_dropped: 0,
        retention_deleted: 0,
        quota_dropped: 0,
        subscriptions: Vec::new(),
        error: Some(reason.clone()),
    }));
    stats.sort_by(|a, b| a.topic.cmp(&b.topic));
    stats
}

/// Saves every topic's dedup snapshot and flushes the metadata store.
async fn checkpoint_all(shared: &Arc<Shared>) {
    let topics = shared.topic_list();
    let meta = Arc::clone(&shared.meta);
    let result = shared
        .env
        .run_blocking(move || -> Result<(), StorageError> {
            for t in &topics {
                t.store.lock().expect("topic lock poisoned").checkpoint(meta.as_ref())?;
            }
            meta.flush()
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "checkpoint failed; metadata will be rebuilt from the log on restart");
    }
}

async fn checkpoint_loop(shared: Arc<Shared>) {
    let every = Duration::from_millis(shared.config.storage.checkpoint_interval_ms);
    while !shared.shutting_down.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        checkpoint_all(&shared).await;
    }
}
