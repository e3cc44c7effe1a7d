//! A node's start and stop: the one place that wires the subsystems, top to bottom. Each
//! subsystem gets what it uses and nothing else; all of them reach topics through the
//! [`Registry`], and none of them knows the client server.
//!
//! ```text
//!   config, env ─► data dir ─► TLS ─► metadata ─► Registry (topics)
//!                                                   │
//!        ┌──────────────┬──────────────┬────────────┼──────────────┐
//!        ▼              ▼              ▼            ▼              ▼
//!   mesh (replication)  Subscriptions  retention    checkpoints   Server (client door)
//! ```
//!
//! `Authz` (who may do what) is shared by the mesh, which tells it of every catalogue
//! change and checks entry signatures with it, and the server, which asks it about every
//! request.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use quinn::Endpoint;
use rill_storage::{NodeName, StorageError, fs::FileSystem};
use rill_transport::{
    certs::{self, Identity},
    net::{self, CloseCode},
    tls::{self, ALPN_CLIENT, ALPN_PEER},
};
use tracing::Instrument;

use crate::{
    authz::Authz,
    config::NodeConfig,
    conflicts::Conflicts,
    dispatch::{self, Subscriptions},
    env::Env,
    functions,
    mesh::{self, MeshHandle},
    registry::Registry,
    retention::{self, BacklogGate},
    server::{self, Server},
};

/// How long a stopping node waits for its connections to close.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

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

/// A running node.
pub struct Node {
    name: NodeName,
    registry: Arc<Registry>,
    endpoint: Endpoint,
    local_addr: SocketAddr,
}

impl Node {
    /// Starts a node: checks the config and data dir, makes dev certificates if needed,
    /// opens metadata and every topic (recovering their logs), and listens.
    pub async fn start(config: NodeConfig, env: Env) -> Result<Node, StartError> {
        config.validate()?;
        let name = config.node_name()?;
        check_data_dir(env.fs.as_ref(), &config.data_dir)?;
        let (server_tls, peer_client, ca) = tls_configs(&config, &name, &env)?;
        let authz = Arc::new(Authz::new(ca, config.auth.superusers));
        let meta = env.meta.open(&config.data_dir)?;
        let registry = Arc::new(Registry::open(env.clone(), meta, &config.data_dir, &config.storage)?);
        let endpoint = net::endpoint(env.net.as_ref(), config.listen, Some(server_tls))
            .await
            .map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let local_addr = endpoint.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let span = tracing::info_span!("node", name = %name);

        // Replication: the driver, a dialer per peer with an address, appenders.
        let conflicts = Arc::new(Conflicts::new(Arc::clone(&registry.meta), env.clone()));
        let (mesh, mesh_events) = MeshHandle::new();
        let ctx = mesh::Context {
            name: name.clone(),
            registry: Arc::clone(&registry),
            conflicts: Arc::clone(&conflicts),
            authz: Arc::clone(&authz),
        };
        span.in_scope(|| mesh::start(Arc::new(ctx), &config.peers, endpoint.clone(), peer_client, &mesh, mesh_events))?;

        // Subscriptions: a dispatcher per subscription, started on first use.
        let limits = dispatch::Limits {
            unacked_max: config.limits.consumer_unacked_messages_max as usize,
            delivery_bytes_max: config.limits.delivery_bytes_max as usize,
        };
        let subscriptions = Arc::new(Subscriptions::new(Arc::clone(&registry), limits));

        // Retention, dedup horizons and backlog quotas; dedup checkpoints.
        let backlog = Arc::new(BacklogGate::default());
        let every = Duration::from_millis(config.storage.retention_check_interval_ms);
        let enforce = retention::run(
            Arc::clone(&registry),
            mesh.clone(),
            (name.clone(), Arc::clone(&authz)),
            Arc::clone(&backlog),
            every,
        );
        tokio::spawn(enforce.instrument(span.clone()));
        let every = Duration::from_millis(config.storage.checkpoint_interval_ms);
        tokio::spawn(Arc::clone(&registry).checkpoint_loop(every).instrument(span.clone()));

        // Stream functions: the supervisor starts and stops them as the catalogue says.
        let function_reports = Arc::new(functions::driver::Reports::default());
        let supervisor = functions::driver::supervise(
            Arc::clone(&registry),
            Arc::clone(&authz),
            mesh.clone(),
            name.clone(),
            Arc::clone(&function_reports),
        );
        tokio::spawn(supervisor.instrument(span.clone()));

        // The client door (and the door peers knock on).
        let parts = server::Parts {
            registry: Arc::clone(&registry),
            subscriptions,
            conflicts,
            backlog,
            mesh,
            authz,
            function_reports,
        };
        let server = Arc::new(Server::new(name.clone(), &config, parts));
        tokio::spawn(server::accept_loop(server, endpoint.clone()).instrument(span.clone()));
        let topics = registry.list().len();
        span.in_scope(|| tracing::info!(%local_addr, topics, "node listening"));
        Ok(Node { name, registry, endpoint, local_addr })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// Stops accepting work, closes connections, and saves metadata.
    pub async fn shutdown(self) {
        self.registry.close();
        self.endpoint.close(CloseCode::Done.into(), b"node shutting down");
        self.registry.checkpoint().await;
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, self.endpoint.wait_idle()).await;
        tracing::info!(node = %self.name, "node stopped");
    }
}

fn data_dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::DataDir { path: path.to_path_buf(), source }
}

/// Fails early, with the directory's name, when the data dir cannot take writes.
fn check_data_dir(fs: &dyn FileSystem, dir: &Path) -> Result<(), StartError> {
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

/// The node's certificates: the configured ones, else dev certificates made once.
fn load_identity(config: &NodeConfig, name: &NodeName) -> Result<Identity, StartError> {
    Ok(match (&config.tls.ca, &config.tls.cert, &config.tls.key) {
        (Some(ca), Some(cert), Some(key)) => Identity { ca: ca.clone(), cert: cert.clone(), key: key.clone() },
        _ => certs::ensure_dev_certs(&config.dev_certs_dir(), name.as_str())?,
    })
}

/// The listener's TLS (clients and peers), the TLS this node dials peers with, and the CA
/// certificates (catalogue signatures are checked against them).
fn tls_configs(config: &NodeConfig, name: &NodeName, env: &Env) -> Result<TlsConfigs, StartError> {
    let identity = load_identity(config, name)?.load()?;
    let tls = tls::server_config(&identity, env.net.tls_time(), &[ALPN_CLIENT, ALPN_PEER])?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls));
    server.transport_config(net::Limits::default().transport_config());
    let mut peer_client =
        quinn::ClientConfig::new(Arc::new(tls::client_config(&identity, env.net.tls_time(), ALPN_PEER)?));
    peer_client.transport_config(net::Limits::peer().transport_config());
    Ok((server, peer_client, identity.ca))
}

type TlsConfigs = (quinn::ServerConfig, quinn::ClientConfig, Vec<rustls::pki_types::CertificateDer<'static>>);
