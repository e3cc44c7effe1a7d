//! Who may do what, checked in one place for every door.
//!
//! A connection's principal comes from its client certificate ([`Authz::admit`]); a bearer
//! token names one too ([`Authz::token`], for the HTTP and MQTT doors). Every request is
//! checked by [`Authz::check`] before anything else happens to it, against the grants the
//! catalogue holds ([`rill_replication::access`]); a refusal names the principal, the
//! action and the resource, is counted per principal, and is logged without the payload.
//!
//! A superuser (a certificate the CA marked so) is allowed everything, unless the node's
//! config refuses superusers. A node's certificate is refused here: it may replicate and
//! nothing else.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use rill_replication::{
    access::{Access, Action, Body, Entry, Incarnation, Records, Resource, Signed, Signer, TokenRecord, Verify},
    function::FunctionDef,
    namespace::ConfigDoc,
};
use rill_storage::{NamespaceName, TopicName, hex};
use rill_transport::certs::{self, Holder};
use rustls::pki_types::CertificateDer;

use crate::{error::NodeError, protocol::Request};

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Principal {
    /// Its name.
    pub(crate) name: Arc<str>,
    /// Allowed everything.
    pub(crate) superuser: bool,
}

/// Checks catalogue signatures against the mesh CA.
#[derive(Debug)]
pub(crate) struct CaVerifier {
    ca: Vec<CertificateDer<'static>>,
}

impl Verify for CaVerifier {
    fn verify(&self, signed: &Signed) -> Result<(), String> {
        let message = Signed::message(&signed.body, &signed.by, signed.at_ms);
        let cert = CertificateDer::from(signed.cert.as_slice());
        match certs::verify_signed(&self.ca, &cert, signed.at_ms, &message, &signed.signature)? {
            Holder::Principal { name, superuser }
                if name == signed.by.principal && superuser == signed.by.superuser =>
            {
                Ok(())
            }
            other => Err(format!("the certificate names {other:?}, not the signer the entry claims ({:?})", signed.by)),
        }
    }
}

/// What the catalogue allows, as of its last change.
#[derive(Debug, Default)]
struct State {
    access: Access,
    records: Records,
}

/// The node's authorisation: the grants in force, and the refusals counted.
#[derive(Debug)]
pub(crate) struct Authz {
    state: RwLock<Arc<State>>,
    refusals: Mutex<BTreeMap<String, u64>>,
    /// Catalogue entry parts peers sent that did not verify.
    entries_refused: AtomicU64,
    verifier: Arc<CaVerifier>,
    /// False when the config refuses superusers.
    superusers: bool,
    /// Counts catalogue changes, for those who act on them (the functions supervisor).
    changes: tokio::sync::watch::Sender<u64>,
}

/// What a request needs.
enum Need<'r> {
    /// Nothing: anyone may ask.
    Nothing,
    /// Any grant; the answer shows only what the principal's grants cover.
    AnyGrant(&'static str),
    /// An action in a namespace.
    On(Action, NamespaceName),
    /// Admin over a namespace.
    Admin(Resource),
    /// A catalogue edit: checked against what it creates or deletes.
    Entry(&'r Signed),
}

fn topic_namespace(topic: &str) -> Result<NamespaceName, NodeError> {
    Ok(TopicName::parse(topic)?.namespace_name())
}

/// What `request` needs; `stream` is the namespace of the subscription stream it came on.
/// One row per request variant, no wildcard: a new variant does not compile without one.
fn need<'r>(request: &'r Request, stream: Option<&NamespaceName>) -> Result<Need<'r>, NodeError> {
    let on_stream = |what: &str| match stream {
        Some(ns) => Ok(Need::On(Action::Consume, ns.clone())),
        None => Err(NodeError::Malformed(format!("{what} is only valid on a subscription stream"))),
    };
    Ok(match request {
        Request::OpenProducer { topic, .. } | Request::Produce { topic, .. } => {
            Need::On(Action::Produce, topic_namespace(topic)?)
        }
        Request::Subscribe { topic, .. }
        | Request::Seek { topic, .. }
        | Request::DeleteSubscription { topic, .. }
        | Request::ListConflicts { topic: Some(topic) } => Need::On(Action::Consume, topic_namespace(topic)?),
        Request::Ack { .. } => on_stream("Ack")?,
        Request::AckCumulative { .. } => on_stream("AckCumulative")?,
        Request::Nack { .. } => on_stream("Nack")?,
        Request::ListTopics => Need::AnyGrant("list topics"),
        Request::Stats => Need::AnyGrant("read statistics"),
        Request::NsGet => Need::AnyGrant("read the catalogue"),
        Request::ListConflicts { topic: None } => Need::AnyGrant("list conflicts"),
        Request::NsEdit { namespace, .. } | Request::PutBlob { namespace, .. } => {
            Need::Admin(Resource::of_namespace(&NamespaceName::parse(namespace)?))
        }
        Request::CatalogueEdit(signed) => Need::Entry(signed),
        Request::WhoAmI { .. } => Need::Nothing,
    })
}

/// The name of a request's variant, for logs.
fn variant(request: &Request) -> String {
    let debug = format!("{request:?}");
    debug.split(|c: char| !c.is_ascii_alphanumeric()).next().unwrap_or_default().to_string()
}

impl Authz {
    /// Checks signatures against `ca`; refuses superusers unless `superusers`.
    pub(crate) fn new(ca: Vec<CertificateDer<'static>>, superusers: bool) -> Authz {
        Authz {
            state: RwLock::default(),
            refusals: Mutex::default(),
            entries_refused: AtomicU64::new(0),
            verifier: Arc::new(CaVerifier { ca }),
            superusers,
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The signature check the catalogue merges with.
    pub(crate) fn verifier(&self) -> Arc<dyn Verify> {
        Arc::clone(&self.verifier) as Arc<dyn Verify>
    }

    /// Counts a catalogue entry part a peer sent that did not verify.
    pub(crate) fn entry_refused(&self) {
        self.entries_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Catalogue entry parts peers sent that did not verify, since start.
    pub(crate) fn entries_refused(&self) -> u64 {
        self.entries_refused.load(Ordering::Relaxed)
    }

    /// Takes the catalogue as it now stands.
    pub(crate) fn update(&self, config: &ConfigDoc) {
        let state = State { access: Access::of(config.records()), records: config.records().clone() };
        *self.state.write().expect("authz lock") = Arc::new(state);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Changes each time the catalogue does.
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The functions in force: name -> (incarnation, definition).
    pub(crate) fn functions(&self) -> BTreeMap<String, (Incarnation, FunctionDef)> {
        self.state().access.functions().clone()
    }

    fn state(&self) -> Arc<State> {
        Arc::clone(&self.state.read().expect("authz lock"))
    }

    /// The principal a client certificate names, or why the connection is refused.
    pub(crate) fn admit(&self, cert: Option<&CertificateDer<'_>>) -> Result<Principal, String> {
        let cert = cert.ok_or("no client certificate")?;
        match certs::holder(cert)? {
            Holder::Node(name) => Err(format!(
                "node '{name}' presented its certificate as a client: a node certificate may only replicate"
            )),
            Holder::Principal { name, superuser: true } if !self.superusers => {
                Err(format!("superuser '{name}' refused: this node's config sets auth.superusers = false"))
            }
            Holder::Principal { name, superuser } => Ok(Principal { name: name.into(), superuser }),
        }
    }

    /// The principal a bearer token names (`rill_<id>_<secret>`), if it is valid at
    /// `now_ms`.
    pub(crate) fn token(&self, token: &str, now_ms: u64) -> Result<Principal, NodeError> {
        let bad = || NodeError::Forbidden("the token is malformed, unknown or revoked".into());
        let (id, secret) = parse_token(token).ok_or_else(bad)?;
        let state = self.state();
        let record = state.access.token(id).ok_or_else(bad)?;
        if !equal_in_constant_time(&token_hash(&record.salt, &secret), &record.hash) {
            return Err(bad());
        }
        if let Some(expires) = record.expires_ms.filter(|e| *e <= now_ms) {
            return Err(NodeError::Forbidden(format!("token {id} expired at {expires} ms")));
        }
        Ok(Principal { name: record.principal.as_str().into(), superuser: false })
    }

    /// Checks that `who` may make `request` (on a subscription stream of `stream`); a
    /// refusal is counted and logged.
    pub(crate) fn check(
        &self,
        who: &Principal,
        request: &Request,
        stream: Option<&NamespaceName>,
    ) -> Result<(), NodeError> {
        let need = need(request, stream)?;
        self.decide(who, need, || variant(request))
    }

    /// Checks that `who` may still receive deliveries from namespace `ns`: the node pushes
    /// them, so no request carries them past [`Authz::check`]. A revoked consume grant
    /// stops a consumer at its next delivery as well as at its next ack.
    pub(crate) fn check_delivery(&self, who: &Principal, ns: &NamespaceName) -> Result<(), NodeError> {
        self.decide(who, Need::On(Action::Consume, ns.clone()), || "Deliver".to_string())
    }

    /// Allows or refuses `need`; a refusal is counted and logged (naming `what` was asked).
    fn decide(&self, who: &Principal, need: Need, what: impl Fn() -> String) -> Result<(), NodeError> {
        if who.superuser {
            return Ok(());
        }
        let state = self.state();
        let access = &state.access;
        let refusal = match need {
            Need::Nothing => None,
            Need::AnyGrant(_) if access.holds_any(&who.name) => None,
            Need::AnyGrant(what) => Some(format!("principal '{}' holds no grant, so it may not {what}", who.name)),
            Need::On(action, ns) if access.allows(&who.name, action, &ns) => None,
            Need::On(action, ns) => {
                Some(format!("principal '{}' may not {action} in '{ns}': no grant covers it", who.name))
            }
            Need::Admin(resource) if access.administers(&who.name, &resource) => None,
            Need::Admin(resource) => Some(format!("principal '{}' is not admin of '{resource}'", who.name)),
            Need::Entry(signed) => edit_refusal(who, signed, &state),
        };
        let Some(why) = refusal else { return Ok(()) };
        *self.refusals.lock().expect("refusals lock").entry(who.name.to_string()).or_default() += 1;
        tracing::warn!(principal = %who.name, request = %what(), reason = %why, "request refused");
        Err(NodeError::Forbidden(why))
    }

    /// True when `who` may see namespace `ns` in lists and statistics.
    pub(crate) fn sees(&self, who: &Principal, ns: &NamespaceName) -> bool {
        who.superuser || self.state().access.sees(&who.name, ns)
    }

    /// The part of the catalogue `who` may see: namespaces its grants cover, grants of
    /// tenants it administers and its own, its own tokens.
    pub(crate) fn view(&self, who: &Principal, mut config: ConfigDoc) -> ConfigDoc {
        if who.superuser {
            return config;
        }
        let state = self.state();
        let access = &state.access;
        config.retain(
            |ns| access.sees(&who.name, ns),
            |record| match record.entry() {
                Entry::Grant(g) => *g.principal == *who.name || access.administers(&who.name, &g.resource),
                Entry::Token(t) => *t.principal == *who.name,
                Entry::Function(f) => f.namespace().is_some_and(|ns| access.sees(&who.name, &ns)),
            },
        );
        config
    }

    /// The grants that count for `who`, as `action resource`.
    pub(crate) fn grants_of(&self, who: &Principal) -> Vec<String> {
        self.state().access.grants_of(&who.name).map(|(a, r)| format!("{a} {r}")).collect()
    }

    /// Refusals since start: every principal's for a superuser, else `who`'s own.
    pub(crate) fn refusals(&self, who: &Principal) -> Vec<(String, u64)> {
        let refusals = self.refusals.lock().expect("refusals lock");
        refusals.iter().filter(|(p, _)| who.superuser || **p == *who.name).map(|(p, n)| (p.clone(), *n)).collect()
    }
}

/// Why `who` may not make a catalogue edit, if it may not.
fn edit_refusal(who: &Principal, signed: &Signed, state: &State) -> Option<String> {
    let name = &*who.name;
    if signed.by != (Signer { principal: name.into(), superuser: who.superuser }) {
        let by = &signed.by.principal;
        return Some(format!("the entry is signed by '{by}', not by the connection's principal '{name}'"));
    }
    let existing = state.records.get(signed.body.incarnation());
    let entry = match (&signed.body, existing) {
        (Body::Create { entry, .. }, _) => entry,
        (Body::Delete { .. }, Some(record)) => record.latest(),
        (Body::Edit { entry, .. }, Some(record)) => {
            // Moving a function needs admin where it is and where it goes.
            if let Some(why) = edit_refusal_for(name, record.latest(), state) {
                return Some(why);
            }
            entry
        }
        // The mesh's apply reports it as not found.
        (Body::Delete { .. } | Body::Edit { .. }, None) => return None,
    };
    edit_refusal_for(name, entry, state)
}

/// Why `name` may not create, change or delete `entry`, if it may not.
fn edit_refusal_for(name: &str, entry: &Entry, state: &State) -> Option<String> {
    match entry {
        Entry::Grant(g) if !state.access.administers(name, &g.resource) => {
            Some(format!("principal '{name}' is not admin of '{}', so it may not change its grants", g.resource))
        }
        Entry::Token(t) if t.principal != name => {
            Some(format!("principal '{name}' may not change tokens of principal '{}'", t.principal))
        }
        Entry::Function(f) if !state.access.administers_function(name, f) => {
            let namespaces: Vec<String> = f.namespaces().iter().map(ToString::to_string).collect();
            Some(format!(
                "principal '{name}' may not change function '{}': it needs admin of {}",
                f.name,
                namespaces.join(", ")
            ))
        }
        Entry::Grant(_) | Entry::Token(_) | Entry::Function(_) => None,
    }
}

/// The prefix of every bearer token.
const TOKEN_PREFIX: &str = "rill_";

fn parse_token(token: &str) -> Option<(&str, Vec<u8>)> {
    let (id, secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    if id.len() != 16 || secret.len() != 64 {
        return None;
    }
    Some((id, hex::decode(secret)?))
}

fn token_hash(salt: &[u8; 16], secret: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(salt);
    ctx.update(secret);
    ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new bearer token for `principal` from 64 random bytes: the token (shown once) and
/// the record the catalogue keeps (its salted hash, never the secret).
pub(crate) fn new_token(principal: &str, expires_ms: Option<u64>, random: &[u8; 64]) -> (String, TokenRecord) {
    let (id, rest) = random.split_at(8);
    let (salt, secret) = rest.split_at(16);
    let salt: [u8; 16] = salt.try_into().expect("16 bytes");
    let secret = &secret[..32];
    let id = hex::encode(id);
    let token = format!("{TOKEN_PREFIX}{id}_{}", hex::encode(secret));
    (token, TokenRecord { id, principal: principal.into(), salt, hash: token_hash(&salt, secret), expires_ms })
}

#[cfg(test)]
mod tests;
