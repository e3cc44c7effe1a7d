//! The dialer: keeps a link to one peer by dialing while the core has no greeted link to
//! it. One attempt at a time; an attempt that gets no answer is abandoned and a new one
//! started, rather than left to QUIC's Initial retransmission backoff, so that a path that
//! comes back is found quickly. The backoff restarts only once a link it dialed is greeted:
//! a link the peer closes at once (a duplicate, or a candidate that lost) counts as a
//! failed attempt, so a refused dialer never redials in a tight loop.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use quinn::{Connection, Endpoint};
use rill_replication::link::CANDIDATE_HELLO_MS;
use rill_transport::backoff::Backoff;
use tokio::sync::{mpsc, watch};

use super::Context;
use super::Event;
use crate::config::PeerConfig;

/// Gaps between dial attempts for the first two minutes of an outage: at most 250 ms.
/// With attempts of 1.2 s whose Initial is resent after 0.3 s and 0.9 s (peer links start
/// from a 100 ms round-trip estimate), an Initial leaves at least every 0.55 s, so a
/// path that comes back is found within a second (an uplink that flaps is the common
/// case at the edge).
const DIAL_BACKOFF_FAST_MS: (u64, u64) = (50, 250);
const DIAL_FAST_FOR: Duration = Duration::from_secs(120);
/// Gaps after that, up to 5 s, so a fleet of edges does not hammer a region that is away
/// for long; attempts then double up to 10 s, for paths slower than they were.
const DIAL_BACKOFF_MS: (u64, u64) = (400, 5_000);
/// The shortest attempt; an attempt lasts at least four round trips of the last link.
const DIAL_ATTEMPT_MS: u64 = 1_200;
const DIAL_ATTEMPT_MAX: Duration = Duration::from_secs(10);
/// Head start the smaller name gets when the peer dials too: the link the smaller name
/// dialed wins a tie, so the larger waits this long before dialing and skips it if a link
/// came up meanwhile. Without it both links form and one is torn down mid-transfer. A
/// peer that has never dialed (an edge behind NAT, for its region) gets no head start.
const DIAL_DEFER_MS: u64 = 500;
/// How long a dialed link may take to be greeted before the attempt counts as failed:
/// the core decides a second link by the peer's Hello, or closes it after
/// `CANDIDATE_HELLO_MS`.
const GREET_WAIT_MS: u64 = CANDIDATE_HELLO_MS + 500;

pub(super) struct Dialer {
    pub(super) ctx: Arc<Context>,
    pub(super) endpoint: Endpoint,
    pub(super) client: quinn::ClientConfig,
}

impl Dialer {
    /// Runs until the driver stops. `greeted` is true while the core has a greeted link to
    /// the peer; `peer_dials` is set once the peer has dialed this node.
    pub(super) async fn run(
        self,
        peer: PeerConfig,
        tx: mpsc::Sender<Event>,
        mut greeted: watch::Receiver<bool>,
        peer_dials: Arc<AtomicBool>,
    ) {
        let Some(addr) = peer.addr else { return };
        let mut fast = Backoff::new(DIAL_BACKOFF_FAST_MS.0, DIAL_BACKOFF_FAST_MS.1);
        let mut slow = Backoff::new(DIAL_BACKOFF_MS.0, DIAL_BACKOFF_MS.1);
        let mut base = Duration::from_millis(DIAL_ATTEMPT_MS);
        let mut attempt = base;
        let mut down_since = tokio::time::Instant::now();
        loop {
            if *greeted.borrow() {
                while *greeted.borrow_and_update() {
                    if greeted.changed().await.is_err() {
                        return;
                    }
                }
                down_since = tokio::time::Instant::now();
            }
            if self.ctx.name.as_str() > peer.name.as_str() && peer_dials.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(Duration::from_millis(DIAL_DEFER_MS), greeted.changed()).await;
                if *greeted.borrow_and_update() {
                    continue;
                }
            }
            let fast_phase = down_since.elapsed() < DIAL_FAST_FOR;
            match self.dial(peer.name.as_str(), addr, attempt).await {
                Ok(conn) => {
                    let rtt = conn.rtt();
                    let event = Event::Link { peer: peer.name.clone(), conn, dialed_by_us: true };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                    let wait = Duration::from_millis(GREET_WAIT_MS);
                    let _ = tokio::time::timeout(wait, greeted.wait_for(|g| *g)).await;
                    if *greeted.borrow_and_update() {
                        fast.reset();
                        slow.reset();
                        base = (rtt * 4).clamp(Duration::from_millis(DIAL_ATTEMPT_MS), DIAL_ATTEMPT_MAX);
                        attempt = base;
                        continue;
                    }
                    tracing::debug!(%addr, "dialed link was not greeted; backing off");
                }
                Err(reason) => {
                    tracing::debug!(%addr, reason, "dial failed");
                    attempt = if fast_phase { base } else { (attempt * 2).min(DIAL_ATTEMPT_MAX) };
                }
            }
            let backoff = if fast_phase { &mut fast } else { &mut slow };
            let delay = backoff.next_delay_ms(self.ctx.registry.env.random.next_u64());
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }

    async fn dial(&self, name: &str, addr: SocketAddr, attempt: Duration) -> Result<Connection, String> {
        let connecting = self.endpoint.connect_with(self.client.clone(), addr, name).map_err(|e| e.to_string())?;
        match tokio::time::timeout(attempt, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => {
                tracing::info!(%addr, error = %e, "peer handshake failed");
                Err(e.to_string())
            }
            Err(_) => Err(format!("no handshake within {} ms", attempt.as_millis())),
        }
    }
}
