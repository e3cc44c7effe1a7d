//! Node configuration: a TOML file, overridden by command-line flags, checked at start-up.
//! Every default lives in [`defaults`] and is documented in `configs/edge.toml`.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use rill_storage::NodeName;
use serde::{Deserialize, Serialize};

/// All defaults, in one place.
pub mod defaults {
    /// Data directory.
    pub const DATA_DIR: &str = "./rill-data";
    /// Client listen address.
    pub const LISTEN: &str = "127.0.0.1:7400";
    /// Node name when neither the file nor a flag gives one and the host has no usable name.
    pub const NAME_FALLBACK: &str = "rill-node";
    /// 64 MiB: retention granularity on a small edge disk.
    pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;
    /// 4 KiB between sparse index entries, as in Kafka.
    pub const INDEX_INTERVAL_BYTES: u64 = 4096;
    /// Produce requests one group commit may take: bounds the latency a group adds.
    pub const GROUP_COMMIT_REQUESTS_MAX: usize = 1024;
    /// Produce requests queued per topic before producers wait (back-pressure).
    pub const PRODUCE_QUEUE_REQUESTS_MAX: usize = 1024;
    /// How often dedup snapshots are written and the metadata store flushed.
    pub const CHECKPOINT_INTERVAL_MS: u64 = 1000;
    /// How often retention and backlog quotas are enforced (Pulsar checks quotas every 60 s;
    /// an edge disk fills faster than that).
    pub const RETENTION_CHECK_INTERVAL_MS: u64 = 1000;
    /// 1 MiB per message (payload, key and headers), as Pulsar's default 5 MB is too much
    /// for an edge gateway's memory.
    pub const MESSAGE_BYTES_MAX: u32 = 1 << 20;
    /// 16 MiB per frame: a produce batch or a delivery.
    pub const FRAME_BYTES_MAX: u32 = 16 << 20;
    /// Messages a consumer may hold unacknowledged before deliveries pause.
    pub const CONSUMER_UNACKED_MESSAGES_MAX: u32 = 10_000;
    /// Bytes of messages per delivery frame.
    pub const DELIVERY_BYTES_MAX: u32 = 1 << 20;
    /// Concurrent client connections.
    pub const CONNECTIONS_MAX: u32 = 1024;
    /// Bytes of produce requests read and not yet answered, over the whole node: 64 MiB
    /// keeps the disk busy (a few group commits' worth) within an edge gateway's memory.
    pub const PRODUCE_INFLIGHT_BYTES_MAX: u32 = 64 << 20;
}

/// Why a configuration was refused; names the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (names the key and line).
        message: String,
    },
    /// A value is out of range or contradicts another.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// A node's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name, as in its certificate and in namespace cluster lists. Default: host name.
    pub name: Option<String>,
    /// Where the log and metadata live. Default `./rill-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Address for client connections (QUIC/UDP). Default `127.0.0.1:7400`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Certificates.
    #[serde(default)]
    pub tls: TlsConfig,
    /// The log.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Limits on clients.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Peers this node links to for replication.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Who may connect.
    #[serde(default)]
    pub auth: AuthConfig,
}

/// Authentication and authorisation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Accept superuser certificates (allowed everything; the dev client certificate and the
    /// one `rill certs init` makes are superusers). Set `false` in production once tenant
    /// admins have their grants: superusers are then refused at the door.
    #[serde(default = "default_true")]
    pub superusers: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { superusers: true }
    }
}

fn default_true() -> bool {
    true
}

/// A peer node. Both sides of a link list each other; a side with the other's `addr`
/// dials it (an edge behind NAT lists its region with an address, the region lists the
/// edge without one). The peer's certificate must carry `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's node name.
    pub name: NodeName,
    /// Where to dial it; `None`: wait for it to dial us.
    pub addr: Option<SocketAddr>,
}

/// Certificate files. When all are absent, dev certificates are made on first start under
/// `<data_dir>/certs` (CA, this node, a client) and reused after.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate (PEM) that clients' and peers' certificates must chain to.
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM).
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    pub key: Option<PathBuf>,
}

/// Log settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Segment size at which a new segment starts, bytes. Default 64 MiB, minimum 64 KiB.
    pub segment_bytes_max: u64,
    /// Bytes between sparse index entries. Default 4096, minimum 512.
    pub index_interval_bytes: u64,
    /// Produce requests one group commit may take. Default 1024, minimum 1.
    pub group_commit_requests_max: usize,
    /// Produce requests queued per topic before producers wait. Default 1024, minimum 1.
    pub produce_queue_requests_max: usize,
    /// Milliseconds between dedup snapshots and metadata flushes. Default 1000, minimum 10.
    pub checkpoint_interval_ms: u64,
    /// Milliseconds between enforcements of retention and backlog quotas. Default 1000,
    /// minimum 10.
    pub retention_check_interval_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            segment_bytes_max: defaults::SEGMENT_BYTES_MAX,
            index_interval_bytes: defaults::INDEX_INTERVAL_BYTES,
            group_commit_requests_max: defaults::GROUP_COMMIT_REQUESTS_MAX,
            produce_queue_requests_max: defaults::PRODUCE_QUEUE_REQUESTS_MAX,
            checkpoint_interval_ms: defaults::CHECKPOINT_INTERVAL_MS,
            retention_check_interval_ms: defaults::RETENTION_CHECK_INTERVAL_MS,
        }
    }
}

/// Limits on what clients may send and hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest message (payload + key + headers), bytes. Default 1 MiB, minimum 1.
    pub message_bytes_max: u32,
    /// Largest frame on a stream, bytes. Default 16 MiB; at least message_bytes_max + 64 KiB.
    pub frame_bytes_max: u32,
    /// Unacked messages per consumer before deliveries pause. Default 10000, minimum 1.
    pub consumer_unacked_messages_max: u32,
    /// Bytes of messages per delivery frame. Default 1 MiB; at most frame_bytes_max / 2.
    pub delivery_bytes_max: u32,
    /// Concurrent client connections. Default 1024, minimum 1.
    pub connections_max: u32,
    /// Bytes of produce requests read and not yet answered, over the whole node; readers
    /// wait when it is used up. Default 64 MiB; at least frame_bytes_max.
    pub produce_inflight_bytes_max: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            message_bytes_max: defaults::MESSAGE_BYTES_MAX,
            frame_bytes_max: defaults::FRAME_BYTES_MAX,
            consumer_unacked_messages_max: defaults::CONSUMER_UNACKED_MESSAGES_MAX,
            delivery_bytes_max: defaults::DELIVERY_BYTES_MAX,
            connections_max: defaults::CONNECTIONS_MAX,
            produce_inflight_bytes_max: defaults::PRODUCE_INFLIGHT_BYTES_MAX,
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(defaults::DATA_DIR)
}

fn default_listen() -> SocketAddr {
    defaults::LISTEN.parse().expect("the default listen address parses")
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: None,
            data_dir: default_data_dir(),
            listen: default_listen(),
            tls: TlsConfig::default(),
            storage: StorageConfig::default(),
            limits: LimitsConfig::default(),
            peers: Vec::new(),
            auth: AuthConfig::default(),
        }
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

impl NodeConfig {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.into(), message },
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), message: e.to_string() })
    }

    /// Rejects out-of-range values and contradictions, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.name {
            NodeName::parse(name).map_err(|e| invalid("name", e.to_string()))?;
        }
        let s = &self.storage;
        if s.segment_bytes_max < 64 << 10 {
            return Err(invalid("storage.segment_bytes_max", "must be at least 65536"));
        }
        if s.index_interval_bytes < 512 {
            return Err(invalid("storage.index_interval_bytes", "must be at least 512"));
        }
        if s.group_commit_requests_max == 0 {
            return Err(invalid("storage.group_commit_requests_max", "must be at least 1"));
        }
        if s.produce_queue_requests_max == 0 {
            return Err(invalid("storage.produce_queue_requests_max", "must be at least 1"));
        }
        if s.checkpoint_interval_ms < 10 {
            return Err(invalid("storage.checkpoint_interval_ms", "must be at least 10"));
        }
        if s.retention_check_interval_ms < 10 {
            return Err(invalid("storage.retention_check_interval_ms", "must be at least 10"));
        }
        let l = &self.limits;
        if l.message_bytes_max == 0 {
            return Err(invalid("limits.message_bytes_max", "must be at least 1"));
        }
        if u64::from(l.frame_bytes_max) < u64::from(l.message_bytes_max) + (64 << 10) {
            return Err(invalid("limits.frame_bytes_max", "must be at least limits.message_bytes_max + 65536"));
        }
        if l.consumer_unacked_messages_max == 0 {
            return Err(invalid("limits.consumer_unacked_messages_max", "must be at least 1"));
        }
        if l.delivery_bytes_max == 0 || l.delivery_bytes_max > l.frame_bytes_max / 2 {
            return Err(invalid("limits.delivery_bytes_max", "must be between 1 and limits.frame_bytes_max / 2"));
        }
        if l.connections_max == 0 {
            return Err(invalid("limits.connections_max", "must be at least 1"));
        }
        if l.produce_inflight_bytes_max < l.frame_bytes_max {
            return Err(invalid("limits.produce_inflight_bytes_max", "must be at least limits.frame_bytes_max"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.peers {
            NodeName::parse(p.name.as_str()).map_err(|e| invalid("peers.name", e.to_string()))?;
            if self.name.as_deref() == Some(p.name.as_str()) {
                return Err(invalid("peers.name", format!("'{}' is this node itself", p.name)));
            }
            if !seen.insert(&p.name) {
                return Err(invalid("peers.name", format!("'{}' is listed twice", p.name)));
            }
        }
        let tls = [&self.tls.ca, &self.tls.cert, &self.tls.key];
        if tls.iter().any(|p| p.is_some()) && !tls.iter().all(|p| p.is_some()) {
            return Err(invalid("tls", "set all of ca, cert and key, or none of them for dev certificates"));
        }
        Ok(())
    }

    /// The node's name: configured, else the host name, else a fallback.
    pub fn node_name(&self) -> Result<NodeName, ConfigError> {
        let name = match &self.name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| NodeName::parse(h).is_ok())
                .unwrap_or_else(|| defaults::NAME_FALLBACK.to_string()),
        };
        NodeName::parse(&name).map_err(|e| invalid("name", e.to_string()))
    }

    /// The directory of dev certificates.
    pub fn dev_certs_dir(&self) -> PathBuf {
        self.data_dir.join("certs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configs_parse_and_validate() {
        for file in ["edge.toml", "cloud.toml", "mesh/edge-1.toml", "mesh/cloud-eu.toml", "mesh/cloud-us.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs").join(file);
            let c = NodeConfig::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
            c.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }

    #[test]
    fn edge_toml_documents_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/edge.toml");
        let mut c = NodeConfig::load(&path).unwrap();
        c.name = None;
        assert_eq!(c, NodeConfig::default());
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(NodeConfig::parse("").unwrap(), NodeConfig::default());
    }

    #[test]
    fn errors_name_the_key() {
        let unknown = NodeConfig::parse("listen = \"127.0.0.1:1\"\nbogus = 1\n").unwrap_err().to_string();
        assert!(unknown.contains("bogus"), "{unknown}");
        let cases = [
            ("[storage]\nsegment_bytes_max = 10\n", "storage.segment_bytes_max"),
            ("[limits]\nmessage_bytes_max = 20000000\n", "limits.frame_bytes_max"),
            ("[tls]\nca = \"x\"\n", "`tls`"),
            ("name = \"bad name\"\n", "`name`"),
            ("name = \"a\"\n[[peers]]\nname = \"a\"\n", "`peers.name`"),
            ("[[peers]]\nname = \"b\"\n[[peers]]\nname = \"b\"\n", "listed twice"),
        ];
        for (text, key) in cases {
            let err = NodeConfig::parse(text).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
