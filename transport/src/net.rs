//! The network edge of a node: where its UDP socket, quinn runtime, endpoint randomness and
//! TLS clock come from. Production uses [`TokioNet`]; the simulation supplies its own.
use std::{fmt, future::Future, io, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use quinn::{AsyncUdpSocket, Endpoint, EndpointConfig, Runtime, TransportConfig, VarInt};
use rustls::time_provider::TimeProvider;

/// A bound UDP socket, or why binding failed.
pub type BindResult = io::Result<Arc<dyn AsyncUdpSocket>>;

/// The I/O edges quinn and rustls need.
pub trait Net: Send + Sync + fmt::Debug {
    /// Binds a UDP socket (async: a simulated network binds through its own runtime).
    fn bind(&self, addr: SocketAddr) -> Pin<Box<dyn Future<Output = BindResult> + Send + '_>>;
    /// The runtime quinn spawns its driver on and takes timers and `now()` from.
    fn runtime(&self) -> Arc<dyn Runtime>;
    /// Endpoint configuration (reset key, connection-id generator, RNG seed).
    fn endpoint_config(&self) -> EndpointConfig;
    /// The clock rustls checks certificate validity against.
    fn tls_time(&self) -> Arc<dyn TimeProvider>;
}

/// Real sockets on the tokio runtime, real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioNet;

impl Net for TokioNet {
    fn bind(&self, addr: SocketAddr) -> Pin<Box<dyn Future<Output = BindResult> + Send + '_>> {
        Box::pin(async move {
            let socket = std::net::UdpSocket::bind(addr)?;
            quinn::TokioRuntime.wrap_udp_socket(socket)
        })
    }
    fn runtime(&self) -> Arc<dyn Runtime> {
        Arc::new(quinn::TokioRuntime)
    }
    fn endpoint_config(&self) -> EndpointConfig {
        EndpointConfig::default()
    }
    fn tls_time(&self) -> Arc<dyn TimeProvider> {
        Arc::new(rustls::time_provider::DefaultTimeProvider)
    }
}

/// Flow-control and liveness limits of one connection. The windows bound how much data a
/// peer can have in flight towards us, which bounds a node's memory per connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes a peer may send on one stream before we read them.
    pub stream_window_bytes: u32,
    /// Bytes a peer may send over all streams of a connection before we read them.
    pub connection_window_bytes: u32,
    /// Bytes we buffer for sending per connection.
    pub send_window_bytes: u32,
    /// Concurrent bidirectional streams a peer may open.
    pub streams_max: u32,
    /// Concurrent unidirectional streams a peer may open (peer links: one per namespace
    /// plus a control stream).
    pub uni_streams_max: u32,
    /// Silence after which a connection is considered dead.
    pub idle_timeout_ms: u32,
    /// Interval of keep-alive pings.
    pub keep_alive_ms: u32,
    /// Round-trip estimate before the first sample (QUIC's default is 333 ms); an
    /// unanswered Initial is resent after three of them, then backing off.
    pub initial_rtt_ms: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        // 8 MiB per stream sustains ~1 GB/s at 8 ms RTT; 32 MiB per connection caps the
        // memory one client can pin. 10 s idle timeout notices a dead peer quickly on a LAN
        // and survives a short radio outage at the edge.
        Limits {
            stream_window_bytes: 8 << 20,
            connection_window_bytes: 32 << 20,
            send_window_bytes: 32 << 20,
            streams_max: 256,
            uni_streams_max: 256,
            idle_timeout_ms: 10_000,
            keep_alive_ms: 2_000,
            initial_rtt_ms: None,
        }
    }
}

impl Limits {
    /// Limits of peer links: as the default, but a link silent for 3 s is dead (with a
    /// keep-alive every second, that is three lost in a row). A dead link is redialed at
    /// once, and a fresh connection finds a restored path within a second, where a live
    /// one would wait out QUIC's probe backoff, which doubles through an outage. The
    /// idle timeout of a connection is the smaller of its two ends', so setting it on the
    /// dialing side is enough.
    pub fn peer() -> Self {
        Limits { idle_timeout_ms: 3_000, keep_alive_ms: 1_000, initial_rtt_ms: Some(100), ..Limits::default() }
    }

    /// The quinn transport configuration for these limits.
    pub fn transport_config(&self) -> Arc<TransportConfig> {
        let mut t = TransportConfig::default();
        t.stream_receive_window(VarInt::from_u32(self.stream_window_bytes));
        t.receive_window(VarInt::from_u32(self.connection_window_bytes));
        t.send_window(u64::from(self.send_window_bytes));
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.streams_max));
        t.max_concurrent_uni_streams(VarInt::from_u32(self.uni_streams_max));
        t.max_idle_timeout(Some(VarInt::from_u32(self.idle_timeout_ms).into()));
        t.keep_alive_interval(Some(Duration::from_millis(u64::from(self.keep_alive_ms))));
        if let Some(rtt) = self.initial_rtt_ms {
            t.initial_rtt(Duration::from_millis(u64::from(rtt)));
        }
        Arc::new(t)
    }
}

/// Binds an endpoint on `addr`; a server when `server` is given.
pub async fn endpoint(net: &dyn Net, addr: SocketAddr, server: Option<quinn::ServerConfig>) -> io::Result<Endpoint> {
    let socket = net.bind(addr).await?;
    Endpoint::new_with_abstract_socket(net.endpoint_config(), server, socket, net.runtime())
}

/// The ALPN protocol a connection negotiated.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

/// The QUIC application codes rill closes connections (and stops streams) with: one list,
/// so a code read in a peer's log means one thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// A normal end: the client is done, the node shuts down, or a link was replaced by
    /// (or lost to) another link to the same peer.
    Done = 0,
    /// A second link to a peer got no Hello in time.
    NoHello = 1,
    /// The peer's certificate names no configured peer.
    NotConfigured = 2,
    /// The peer broke the replication protocol.
    Violation = 3,
    /// Storing a batch the peer sent failed here; it resends on the next link.
    AppendFailed = 4,
    /// A frame did not decode.
    BadFrame = 5,
    /// An outgoing queue filled up (the other side does not read), or a peer sent more
    /// than it may have in flight.
    Stalled = 6,
    /// The connection negotiated no protocol (ALPN) this node serves.
    UnsupportedProtocol = 7,
    /// The client's certificate is not allowed in: a node's certificate on the client
    /// door, a certificate naming no principal, or a superuser where the config refuses
    /// them.
    Forbidden = 8,
}

impl From<CloseCode> for VarInt {
    fn from(code: CloseCode) -> VarInt {
        VarInt::from_u32(code as u32)
    }
}
