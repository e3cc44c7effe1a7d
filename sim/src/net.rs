//! The network edge in simulation: quinn over turmoil's simulated UDP, with quinn's timers
//! and spawning on turmoil's runtime, seeded endpoint randomness, and the TLS clock on
//! simulated time.
use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    io::{self, IoSliceMut},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use quinn::{
    AsyncTimer, AsyncUdpSocket, ConnectionId, ConnectionIdGenerator, EndpointConfig, Runtime, UdpPoller,
    udp::{RecvMeta, Transmit},
};
use rill_transport::net::{BindResult, Net};

use crate::rng::splitmix64;

/// A running hash of every datagram seen, as (simulated microseconds, sender, receiver,
/// length): the trace that shows a seed replays identically, in constant memory.
#[derive(Debug)]
pub struct Trace {
    /// (FNV-1a state, datagrams)
    state: Mutex<(u64, usize)>,
}

impl Default for Trace {
    fn default() -> Self {
        Trace { state: Mutex::new((0xcbf2_9ce4_8422_2325, 0)) }
    }
}

impl Trace {
    fn record(&self, from: SocketAddr, to: SocketAddr, len: usize) {
        let t = turmoil::sim_elapsed().unwrap_or_default().as_micros() as u64;
        let mut state = self.state.lock().expect("trace lock");
        // FNV-1a: stable across builds, unlike the std hasher.
        let mut h = state.0;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&t.to_le_bytes());
        for addr in [from, to] {
            match addr.ip() {
                IpAddr::V4(ip) => eat(&ip.octets()),
                IpAddr::V6(ip) => eat(&ip.octets()),
            }
            eat(&addr.port().to_le_bytes());
        }
        eat(&(len as u64).to_le_bytes());
        *state = (h, state.1 + 1);
    }

    /// The hash of every datagram's time, addresses and length so far.
    pub fn hash(&self) -> u64 {
        self.state.lock().expect("trace lock").0
    }

    /// Datagrams recorded.
    pub fn len(&self) -> usize {
        self.state.lock().expect("trace lock").1
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Thousandths of the datagrams lost, per (sender, receiver).
type LossRates = BTreeMap<(IpAddr, IpAddr), u32>;

/// Datagram loss per link (turmoil's own loss model partitions links at random instead),
/// drawn from one seeded generator in send order, so a seed replays identically.
#[derive(Debug)]
pub struct Loss {
    state: Mutex<(u64, LossRates)>,
}

impl Loss {
    /// No loss yet; draws derive from `seed`.
    pub fn new(seed: u64) -> Self {
        Loss { state: Mutex::new((seed, BTreeMap::new())) }
    }

    /// Drops this share (in thousandths) of the datagrams between `a` and `b`, both ways.
    pub fn set(&self, a: IpAddr, b: IpAddr, permille: u32) {
        let mut state = self.state.lock().expect("loss lock");
        for pair in [(a, b), (b, a)] {
            if permille == 0 {
                state.1.remove(&pair);
            } else {
                state.1.insert(pair, permille);
            }
        }
    }

    fn drops(&self, from: IpAddr, to: IpAddr) -> bool {
        let mut state = self.state.lock().expect("loss lock");
        let Some(&permille) = state.1.get(&(from, to)) else { return false };
        splitmix64(&mut state.0) % 1000 < u64::from(permille)
    }
}

/// The simulated network of one host boot.
#[derive(Debug)]
pub struct SimNet {
    seed: u64,
    endpoints: AtomicU64,
    trace: Arc<Trace>,
    /// The host's address and the loss model: sockets bind the unspecified address, so
    /// the loss model needs the host's own.
    loss: Option<(IpAddr, Arc<Loss>)>,
}

impl SimNet {
    /// A network edge whose endpoint randomness derives from `seed` (salt it per host and
    /// boot so a restarted node never reuses connection ids).
    pub fn new(seed: u64, trace: Arc<Trace>) -> Self {
        SimNet { seed, endpoints: AtomicU64::new(0), trace, loss: None }
    }

    /// The same, losing datagrams as `loss` says; `host` is this host's address.
    pub fn with_loss(self, host: IpAddr, loss: Arc<Loss>) -> Self {
        SimNet { loss: Some((host, loss)), ..self }
    }
}

impl Net for SimNet {
    fn bind(&self, addr: SocketAddr) -> Pin<Box<dyn Future<Output = BindResult> + Send + '_>> {
        Box::pin(async move {
            let socket = turmoil::net::UdpSocket::bind(addr).await?;
            let socket: Arc<dyn AsyncUdpSocket> =
                Arc::new(SimUdp { socket, trace: Arc::clone(&self.trace), loss: self.loss.clone() });
            Ok(socket)
        })
    }
    fn runtime(&self) -> Arc<dyn Runtime> {
        Arc::new(TurmoilRuntime)
    }
    fn endpoint_config(&self) -> EndpointConfig {
        let n = self.endpoints.fetch_add(1, Ordering::Relaxed);
        endpoint_config(self.seed.wrapping_mul(1_000_003).wrapping_add(n))
    }
    fn tls_time(&self) -> Arc<dyn rustls::time_provider::TimeProvider> {
        Arc::new(SimTime)
    }
}

/// Endpoint randomness (reset key, connection-id generator, per-connection RNG) from a seed.
fn endpoint_config(seed: u64) -> EndpointConfig {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed.to_le_bytes());
    let mut config = EndpointConfig::new(Arc::new(key));
    let mut rng_seed = [0u8; 32];
    rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
    config.rng_seed(Some(rng_seed));
    config.cid_generator(move || Box::new(SequentialCids { seed, next: 0 }));
    config
}

/// Connection ids (seed, counter): quinn's default generator uses the thread RNG.
struct SequentialCids {
    seed: u64,
    next: u32,
}

impl ConnectionIdGenerator for SequentialCids {
    fn generate_cid(&mut self) -> ConnectionId {
        self.next += 1;
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&(self.seed as u32).to_be_bytes());
        b[4..].copy_from_slice(&self.next.to_be_bytes());
        ConnectionId::new(&b)
    }
    fn cid_len(&self) -> usize {
        8
    }
    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The TLS clock: turmoil's simulated wall clock.
#[derive(Debug)]
struct SimTime;

impl rustls::time_provider::TimeProvider for SimTime {
    fn current_time(&self) -> Option<rustls_pki_types::UnixTime> {
        turmoil::since_epoch().map(rustls_pki_types::UnixTime::since_unix_epoch)
    }
}

/// quinn's runtime on the host's tokio runtime, whose clock turmoil drives.
#[derive(Debug)]
struct TurmoilRuntime;

impl Runtime for TurmoilRuntime {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(SimTimer(Box::pin(tokio::time::sleep_until(t.into()))))
    }
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }
    fn wrap_udp_socket(&self, _: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Err(io::Error::other("no real sockets in simulation"))
    }
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

#[derive(Debug)]
struct SimTimer(Pin<Box<tokio::time::Sleep>>);

impl AsyncTimer for SimTimer {
    fn reset(mut self: Pin<&mut Self>, t: Instant) {
        self.0.as_mut().reset(t.into())
    }
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        Future::poll(self.0.as_mut(), cx)
    }
}

struct SimUdp {
    socket: turmoil::net::UdpSocket,
    trace: Arc<Trace>,
    loss: Option<(IpAddr, Arc<Loss>)>,
}

impl fmt::Debug for SimUdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimUdp({:?})", self.socket.local_addr())
    }
}

/// turmoil's UDP has no send back-pressure.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }
    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let local = self.socket.local_addr()?;
        let segment = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for datagram in t.contents.chunks(segment) {
            self.trace.record(local, t.destination, datagram.len());
            if self.loss.as_ref().is_some_and(|(host, l)| l.drops(*host, t.destination.ip())) {
                continue;
            }
            // With no link to the destination turmoil errors; real UDP drops silently.
            let _ = self.socket.try_send_to(datagram, t.destination);
        }
        Ok(())
    }
    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.socket.try_recv_from(&mut bufs[0]) {
                Ok((len, addr)) => {
                    meta[0] = RecvMeta { addr, len, stride: len, ecn: None, dst_ip: None };
                    return Poll::Ready(Ok(1));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let readable = self.socket.readable();
                    tokio::pin!(readable);
                    match readable.poll(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
    fn may_fragment(&self) -> bool {
        false
    }
}
