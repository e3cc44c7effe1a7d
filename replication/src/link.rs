//! Link identity: which connection to a peer is *the* link, and what happens to the others.
//!
//! Both ends of a pair may dial, a dialer redials when it believes its link dead, and a
//! peer may restart while the other end still holds its old connection. The rules, owned
//! here and nowhere else:
//! - A link opened while there is none becomes current at once, and our Hello goes out on it.
//! - A link opened by the same side that opened the current one replaces it at once: that
//!   side only dials when it has given the current link up.
//! - A link opened by the other side while one is current becomes a *candidate*. Nothing
//!   is sent on it until it wins. It is decided by the Hello the peer sends on it:
//!   - a boot id other than the one the current link's Hello carried: the peer restarted,
//!     so the current link is dead; the candidate replaces it;
//!   - otherwise the link dialed by the smaller node name is kept (both ends decide the
//!     same way, since both know both names), and the loser is closed as a duplicate.
//! - A candidate left without a Hello for [`CANDIDATE_HELLO_MS`] is closed. When the
//!   current link closes, the candidate takes its place.
//! - Everything a peer says is tagged with the link it came on; only the current link's
//!   messages, acks and append results count. Batch numbers restart their meaning on every
//!   link, so a result from a replaced link must never acknowledge anything.
use std::fmt;

/// How long a candidate link may wait for the peer's Hello. The peer sends its Hello as
/// soon as it adopts the link, so a candidate without one is a link both ends hold as a
/// candidate; closing it lets the dialer try again.
pub const CANDIDATE_HELLO_MS: u64 = 2_000;

/// Identifies one connection to a peer. The driver numbers connections and never reuses a
/// number while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId(pub u64);

impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "link#{}", self.0)
    }
}

/// Why the core closes a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer is not in this node's peer list.
    NotConfigured,
    /// Another link to the same peer was kept (the one the smaller name dialed).
    Duplicate,
    /// A newer link to the same peer took its place.
    Replaced,
    /// A candidate link got no Hello in time.
    NoHello,
    /// Storing a batch the peer sent failed here; the peer resends on the next link.
    AppendFailed(String),
    /// The peer broke the protocol.
    Violation(String),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::NotConfigured => f.write_str("not a configured peer"),
            CloseReason::Duplicate => f.write_str("duplicate link: the one the smaller name dialed is kept"),
            CloseReason::Replaced => f.write_str("replaced by a newer link"),
            CloseReason::NoHello => f.write_str("no Hello on a second link in time"),
            CloseReason::AppendFailed(e) => write!(f, "storing a batch failed: {e}"),
            CloseReason::Violation(e) => write!(f, "protocol violation: {e}"),
        }
    }
}

/// Link events of one peer since this node started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Links that became current.
    pub ups: u64,
    /// Current links replaced by a newer one (a peer restart or a redial).
    pub replacements: u64,
    /// Links refused: duplicates, candidates without a Hello, unknown peers.
    pub refusals: u64,
    /// When the last of these happened (node clock, ms).
    pub last_change_ms: Option<u64>,
}

/// One connection as the core sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Link {
    pub(crate) id: LinkId,
    pub(crate) dialed_by_us: bool,
    pub(crate) opened_ms: u64,
    /// The peer's boot id, once its Hello arrived on this link.
    pub(crate) peer_boot: Option<u64>,
}

/// What opening a link did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// It is the current link now (there was none).
    Adopted,
    /// It replaced this current link.
    Replaced(LinkId),
    /// It waits for the peer's Hello; an older candidate, if any, is dropped.
    Candidate(Option<LinkId>),
}

/// What a Hello did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Greeting {
    /// The current link is greeted.
    Greeted,
    /// The candidate won and replaced this link.
    Promoted(LinkId),
    /// The candidate lost: close it.
    Refused,
    /// A second Hello on the same link.
    Repeated,
    /// Not a link we hold.
    Stale,
}

/// The links to one peer.
#[derive(Debug, Default)]
pub(crate) struct PeerLinks {
    pub(crate) current: Option<Link>,
    pub(crate) candidate: Option<Link>,
    pub(crate) stats: LinkStats,
}

impl PeerLinks {
    /// The current link, once the peer's Hello arrived on it.
    pub(crate) fn greeted(&self) -> Option<LinkId> {
        self.current.filter(|l| l.peer_boot.is_some()).map(|l| l.id)
    }

    pub(crate) fn is_current(&self, id: LinkId) -> bool {
        self.current.is_some_and(|l| l.id == id)
    }

    fn note(&mut self, now_ms: u64) {
        self.stats.last_change_ms = Some(now_ms);
    }

    pub(crate) fn open(&mut self, now_ms: u64, id: LinkId, dialed_by_us: bool) -> Opened {
        let link = Link { id, dialed_by_us, opened_ms: now_ms, peer_boot: None };
        self.note(now_ms);
        match self.current {
            None => {
                self.current = Some(link);
                self.stats.ups += 1;
                Opened::Adopted
            }
            Some(old) if old.dialed_by_us == dialed_by_us => {
                self.current = Some(link);
                self.stats.ups += 1;
                self.stats.replacements += 1;
                Opened::Replaced(old.id)
            }
            Some(_) => {
                let dropped = self.candidate.replace(link).map(|c| c.id);
                if dropped.is_some() {
                    self.stats.refusals += 1;
                }
                Opened::Candidate(dropped)
            }
        }
    }

    /// A Hello with `boot` arrived on link `id`. `smaller_dials_us` tells whether this
    /// node has the smaller name (so a link it dialed wins a tie).
    pub(crate) fn hello(&mut self, now_ms: u64, id: LinkId, boot: u64, we_are_smaller: bool) -> Greeting {
        if let Some(current) = self.current.as_mut().filter(|l| l.id == id) {
            if current.peer_boot.is_some() {
                return Greeting::Repeated;
            }
            current.peer_boot = Some(boot);
            return Greeting::Greeted;
        }
        let Some(candidate) = self.candidate.filter(|l| l.id == id) else { return Greeting::Stale };
        let current = self.current.expect("a candidate exists only beside a current link");
        let restarted = current.peer_boot.is_some_and(|b| b != boot);
        // The link the smaller name dialed wins: ours if we are smaller and dialed it.
        let candidate_wins = restarted || candidate.dialed_by_us == we_are_smaller;
        self.candidate = None;
        self.note(now_ms);
        if candidate_wins {
            self.current = Some(Link { peer_boot: Some(boot), ..candidate });
            self.stats.ups += 1;
            self.stats.replacements += 1;
            Greeting::Promoted(current.id)
        } else {
            self.stats.refusals += 1;
            Greeting::Refused
        }
    }

    /// Link `id` closed. Returns true when it was the current link; the candidate, if
    /// any, then takes its place (and is returned so the caller greets it).
    pub(crate) fn close(&mut self, now_ms: u64, id: LinkId) -> (bool, Option<LinkId>) {
        if self.candidate.is_some_and(|c| c.id == id) {
            self.candidate = None;
            return (false, None);
        }
        if !self.is_current(id) {
            return (false, None);
        }
        self.note(now_ms);
        self.current = self.candidate.take();
        let promoted = self.current.map(|l| l.id);
        if promoted.is_some() {
            self.stats.ups += 1;
        }
        (true, promoted)
    }

    /// A candidate that waited too long for its Hello.
    pub(crate) fn expired_candidate(&mut self, now_ms: u64) -> Option<LinkId> {
        let c = self.candidate.filter(|c| now_ms.saturating_sub(c.opened_ms) >= CANDIDATE_HELLO_MS)?;
        self.candidate = None;
        self.stats.refusals += 1;
        self.note(now_ms);
        Some(c.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: LinkId = LinkId(1);
    const B: LinkId = LinkId(2);

    #[test]
    fn the_first_link_is_adopted_and_a_second_by_the_same_dialer_replaces_it() {
        let mut p = PeerLinks::default();
        assert_eq!(p.open(0, A, true), Opened::Adopted);
        assert_eq!(p.open(5, B, true), Opened::Replaced(A));
        assert!(p.is_current(B));
        assert_eq!((p.stats.ups, p.stats.replacements, p.stats.last_change_ms), (2, 1, Some(5)));
    }

    #[test]
    fn when_both_dial_the_link_the_smaller_name_dialed_wins_on_both_ends() {
        // "a" < "b". a dialed A, b dialed B; each end saw its own first.
        let (mut at_a, mut at_b) = (PeerLinks::default(), PeerLinks::default());
        at_a.open(0, A, true);
        at_b.open(0, B, true);
        assert_eq!(at_a.open(1, B, false), Opened::Candidate(None));
        assert_eq!(at_b.open(1, A, false), Opened::Candidate(None));
        // Hellos of the same boots cross.
        assert_eq!(at_a.hello(2, A, 7, true), Greeting::Greeted);
        assert_eq!(at_a.hello(2, B, 7, true), Greeting::Refused);
        assert_eq!(at_b.hello(2, A, 9, false), Greeting::Promoted(B));
        assert!(at_a.is_current(A) && at_b.is_current(A));
    }

    #[test]
    fn a_restarted_peer_replaces_the_dead_link_whoever_dialed_it() {
        // We are smaller and dialed A; the peer restarts and dials B.
        let mut p = PeerLinks::default();
        p.open(0, A, true);
        assert_eq!(p.hello(1, A, 100, true), Greeting::Greeted);
        assert_eq!(p.open(50, B, false), Opened::Candidate(None));
        assert_eq!(p.hello(51, B, 200, true), Greeting::Promoted(A));
        assert_eq!(p.greeted(), Some(B));
        // Without the restart (same boot) our own link would have won.
        let mut q = PeerLinks::default();
        q.open(0, A, true);
        q.hello(1, A, 100, true);
        q.open(50, B, false);
        assert_eq!(q.hello(51, B, 100, true), Greeting::Refused);
    }

    #[test]
    fn a_second_hello_on_a_link_is_a_violation_and_stale_links_are_ignored() {
        let mut p = PeerLinks::default();
        p.open(0, A, true);
        assert_eq!(p.hello(1, A, 1, true), Greeting::Greeted);
        assert_eq!(p.hello(2, A, 1, true), Greeting::Repeated);
        assert_eq!(p.hello(2, B, 1, true), Greeting::Stale);
        assert_eq!(p.close(3, B), (false, None));
        assert!(p.is_current(A));
    }

    #[test]
    fn a_candidate_takes_over_when_the_current_link_closes_or_expires_without_a_hello() {
        let mut p = PeerLinks::default();
        p.open(0, A, true);
        p.open(10, B, false);
        assert_eq!(p.close(20, A), (true, Some(B)));
        assert!(p.is_current(B) && p.greeted().is_none());
        p.open(30, LinkId(3), true);
        assert_eq!(p.expired_candidate(30 + CANDIDATE_HELLO_MS - 1), None);
        assert_eq!(p.expired_candidate(30 + CANDIDATE_HELLO_MS), Some(LinkId(3)));
        assert_eq!(p.stats.refusals, 1);
    }
}
