//! Who may do what: grants and tokens, as signed entries of the catalogue.
//!
//! An entry is created with an incarnation (64 random bits) and deleted by naming that
//! incarnation (DESIGN section 8). Both are signed by the client principal who made them,
//! with its certificate attached, and a node merges an entry only after [`Verify`] checked
//! the signature against the mesh CA: a node cannot sign as a client, so a stolen node
//! certificate cannot grant anything through gossip.
//!
//! The catalogue keeps every entry with its optional deletion; merge is a union per
//! incarnation (a deletion, once known, stays), so a concurrent edit never resurrects a
//! deleted entry, and re-creating draws a new incarnation.
//!
//! Whether a signed entry counts is decided from the whole catalogue ([`Access::of`]), the
//! same way on every node, so nodes that hold the same entries agree:
//! - a grant counts if its signer is a superuser or holds a counted `admin` grant covering
//!   its resource (the least fixed point, so a circle of admins granting each other, with
//!   no superuser at its root, counts for nothing);
//! - a deletion counts if its signer is a superuser or ever held such an admin grant
//!   (computed over every grant, deleted or not: deciding it from counted grants alone
//!   would let two admins' concurrent revocations of each other have no single answer);
//! - a token counts if its signer is a superuser or the token's own principal, and so
//!   does its deletion.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use rill_storage::{NamespaceName, name::check_part};

use crate::function::FunctionDef;
use serde::{Deserialize, Serialize};

/// An entry's identity across its life: drawn at random when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Incarnation(pub u64);

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Write messages.
    Produce,
    /// Read messages through subscriptions, and move or delete those subscriptions.
    Consume,
    /// Everything the principal could do with produce and consume, plus the namespaces'
    /// policies, clusters and grants (and, later, functions, models and schemas).
    Admin,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Produce => "produce",
            Action::Consume => "consume",
            Action::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "produce" => Ok(Action::Produce),
            "consume" => Ok(Action::Consume),
            "admin" => Ok(Action::Admin),
            _ => Err(format!("'{s}' is not an action (produce, consume, admin)")),
        }
    }
}

/// What a grant covers: a whole tenant, or one namespace of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Resource {
    /// The tenant.
    pub tenant: String,
    /// One namespace of it; `None`: all of them, present and future.
    pub namespace: Option<String>,
}

impl Resource {
    /// Parses `tenant` or `tenant/namespace`.
    pub fn parse(s: &str) -> Result<Resource, String> {
        let (tenant, namespace) = match s.split_once('/') {
            Some((t, n)) => (t, Some(n)),
            None => (s, None),
        };
        check_part("tenant", tenant).map_err(|e| e.to_string())?;
        if let Some(n) = namespace {
            check_part("namespace", n).map_err(|e| format!("'{s}': {e} (the form is TENANT or TENANT/NAMESPACE)"))?;
        }
        Ok(Resource { tenant: tenant.into(), namespace: namespace.map(Into::into) })
    }

    /// Exactly namespace `ns`.
    pub fn of_namespace(ns: &NamespaceName) -> Resource {
        Resource { tenant: ns.tenant().into(), namespace: Some(ns.namespace().into()) }
    }

    /// True when this resource includes namespace `ns`.
    pub fn covers(&self, ns: &NamespaceName) -> bool {
        self.tenant == ns.tenant() && self.namespace.as_deref().is_none_or(|n| n == ns.namespace())
    }

    /// True when this resource includes all of `other`.
    pub fn includes(&self, other: &Resource) -> bool {
        self.tenant == other.tenant && (self.namespace.is_none() || self.namespace == other.namespace)
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(n) => write!(f, "{}/{n}", self.tenant),
            None => f.write_str(&self.tenant),
        }
    }
}

/// A principal may do `action` on `resource`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// Who.
    pub principal: String,
    /// What.
    pub action: Action,
    /// Where.
    pub resource: Resource,
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.principal, self.action, self.resource)
    }
}

/// A bearer token as the catalogue keeps it: never the secret, only its salted hash.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's public id (the part before its secret).
    pub id: String,
    /// The principal it authenticates.
    pub principal: String,
    /// Random salt.
    pub salt: [u8; 16],
    /// SHA-256 of salt then secret.
    pub hash: [u8; 32],
    /// When it stops working (milliseconds since the Unix epoch); `None`: never.
    pub expires_ms: Option<u64>,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Entry {
    /// A grant.
    Grant(Grant),
    /// A bearer token.
    Token(TokenRecord),
    /// A stream function.
    Function(FunctionDef),
}

/// What a signer signed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Body {
    /// Creates `entry` as `incarnation`.
    Create {
        /// The new incarnation.
        incarnation: Incarnation,
        /// The entry.
        entry: Entry,
    },
    /// Deletes an incarnation.
    Delete {
        /// The incarnation.
        incarnation: Incarnation,
    },
    /// Replaces an incarnation's entry (of the same kind and name: a function's update,
    /// pause or resume). Of two edits the later signed wins, on every node.
    Edit {
        /// The incarnation.
        incarnation: Incarnation,
        /// The new entry.
        entry: Entry,
    },
}

impl Body {
    /// The incarnation the body names.
    pub fn incarnation(&self) -> Incarnation {
        match self {
            Body::Create { incarnation, .. } | Body::Delete { incarnation } | Body::Edit { incarnation, .. } => {
                *incarnation
            }
        }
    }
}

/// Who signed, as the signature claims it; [`Verify`] checks the claim against the
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Signer {
    /// The principal.
    pub principal: String,
    /// True for a superuser.
    pub superuser: bool,
}

/// A signed create or delete.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Signed {
    /// What was signed.
    pub body: Body,
    /// Who signed it (claimed; verified).
    pub by: Signer,
    /// When it was signed (milliseconds since the Unix epoch); the certificate must be
    /// valid then.
    pub at_ms: u64,
    /// The signer's certificate (DER).
    #[serde(with = "serde_bytes")]
    pub cert: Vec<u8>,
    /// The signature of [`Signed::message`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Prefix of every signed message, so a signature of anything else never verifies as an
/// entry's.
const SIGNING_CONTEXT: &str = "rill catalogue entry v1";

impl Signed {
    /// The bytes the signature covers: everything but the certificate and the signature.
    pub fn message(body: &Body, by: &Signer, at_ms: u64) -> Vec<u8> {
        postcard::to_stdvec(&(SIGNING_CONTEXT, body, by, at_ms)).expect("a body always encodes")
    }
}

/// Checks signatures for the catalogue (the node checks them against the mesh CA).
pub trait Verify: Send + Sync + fmt::Debug {
    /// `Ok` when `signed.signature` is the signature of its message by the key of
    /// `signed.cert`, a client certificate of the mesh CA valid at `signed.at_ms` naming
    /// `signed.by`.
    fn verify(&self, signed: &Signed) -> Result<(), String>;
}

/// One entry of the catalogue: its creation, its latest edit, and once deleted, its
/// deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The signed creation.
    pub create: Signed,
    /// The signed deletion (a tombstone: kept).
    pub delete: Option<Signed>,
    /// The latest signed edit.
    pub edit: Option<Signed>,
}

fn entry_of(signed: &Signed) -> Option<&Entry> {
    match &signed.body {
        Body::Create { entry, .. } | Body::Edit { entry, .. } => Some(entry),
        Body::Delete { .. } => None,
    }
}

impl Record {
    /// The entry as created.
    pub fn entry(&self) -> &Entry {
        entry_of(&self.create).expect("records are checked on the way in: a creation holds an entry")
    }

    /// The entry as last edited (as created when never edited); whether the edit counts is
    /// for [`Access::of`] to say.
    pub fn latest(&self) -> &Entry {
        self.edit.as_ref().and_then(entry_of).unwrap_or_else(|| self.entry())
    }
}

/// True when `edit` may replace `created`: the same kind, and for a function the same name.
/// Grants and tokens are never edited (revoke and grant again).
fn same_kind(created: &Entry, edit: &Entry) -> bool {
    matches!((created, edit), (Entry::Function(a), Entry::Function(b)) if a.name == b.name)
}

/// Why a signed edit was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// The signature or certificate does not hold.
    #[error("signature refused: {0}")]
    Signature(String),
    /// A deletion of an incarnation this node does not hold.
    #[error("entry {0} does not exist")]
    Unknown(Incarnation),
    /// The parts do not fit together.
    #[error("malformed entry {0}: {1}")]
    Malformed(Incarnation, &'static str),
}

/// Every entry of the catalogue, by incarnation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Records(BTreeMap<Incarnation, Record>);

impl Records {
    /// Adds one signed creation, deletion or edit; returns the record as it now stands if
    /// it changed.
    pub fn apply(&mut self, signed: Signed, verify: &dyn Verify) -> Result<Option<Record>, EntryError> {
        let incarnation = signed.body.incarnation();
        verify.verify(&signed).map_err(EntryError::Signature)?;
        match (&signed.body, self.0.get_mut(&incarnation)) {
            (Body::Create { .. }, None) => {
                let record = Record { create: signed, delete: None, edit: None };
                self.0.insert(incarnation, record.clone());
                Ok(Some(record))
            }
            // Two creations of one incarnation (only a signer reusing one makes them):
            // every node keeps the smaller.
            (Body::Create { .. }, Some(r)) if r.create <= signed => Ok(None),
            (Body::Create { .. }, Some(r)) => {
                r.create = signed;
                Ok(Some(r.clone()))
            }
            (Body::Delete { .. } | Body::Edit { .. }, None) => Err(EntryError::Unknown(incarnation)),
            (Body::Edit { entry, .. }, Some(r)) => {
                if !same_kind(r.entry(), entry) {
                    return Err(EntryError::Malformed(incarnation, "an edit must keep the kind and the name"));
                }
                // The later signed edit wins (ties: the greater part), on every node.
                if r.edit.as_ref().is_some_and(|e| (e.at_ms, e) >= (signed.at_ms, &signed)) {
                    return Ok(None);
                }
                r.edit = Some(signed);
                Ok(Some(r.clone()))
            }
            (Body::Delete { .. }, Some(r)) => {
                // Of two deletions, every node keeps the smaller: one answer everywhere.
                if r.delete.as_ref().is_some_and(|d| *d <= signed) {
                    return Ok(None);
                }
                r.delete = Some(signed);
                Ok(Some(r.clone()))
            }
        }
    }

    /// Merges records from a peer: each part is verified before it is taken. Returns the
    /// records that changed, and why parts were refused.
    pub fn merge(&mut self, theirs: &Records, verify: &dyn Verify) -> (Records, Vec<String>) {
        let mut changed = Records::default();
        let mut refused = Vec::new();
        for (incarnation, record) in &theirs.0 {
            if self.0.get(incarnation) == Some(record) {
                continue;
            }
            if let Err(why) = check_record(*incarnation, record) {
                refused.push(why.to_string());
                continue;
            }
            let mut parts = vec![&record.create];
            parts.extend(&record.delete);
            parts.extend(&record.edit);
            for part in parts {
                // A part held already needs no second signature check.
                let ours = self.0.get(incarnation);
                let held = ours.is_some_and(|r| {
                    r.create == *part || r.delete.as_ref() == Some(part) || r.edit.as_ref() == Some(part)
                });
                if held {
                    continue;
                }
                match self.apply(part.clone(), verify) {
                    Ok(Some(r)) => {
                        changed.0.insert(*incarnation, r);
                    }
                    Ok(None) => {}
                    Err(e) => refused.push(e.to_string()),
                }
            }
        }
        (changed, refused)
    }

    /// Every record, by incarnation.
    pub fn iter(&self) -> impl Iterator<Item = (&Incarnation, &Record)> {
        self.0.iter()
    }

    /// The record of an incarnation.
    pub fn get(&self, incarnation: Incarnation) -> Option<&Record> {
        self.0.get(&incarnation)
    }

    /// Inserts a record as it stands (a delta of the catalogue).
    pub(crate) fn insert(&mut self, incarnation: Incarnation, record: Record) {
        self.0.insert(incarnation, record);
    }

    /// True when there is no record.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Keeps the records `keep` says yes to (for views of the catalogue).
    pub fn retain(&mut self, mut keep: impl FnMut(&Record) -> bool) {
        self.0.retain(|_, r| keep(r));
    }
}

fn check_record(incarnation: Incarnation, record: &Record) -> Result<(), EntryError> {
    let bad = |why| Err(EntryError::Malformed(incarnation, why));
    if !matches!(&record.create.body, Body::Create { incarnation: i, .. } if *i == incarnation) {
        return bad("its creation names another incarnation");
    }
    if let Some(d) = &record.delete
        && d.body != (Body::Delete { incarnation })
    {
        return bad("its deletion names another incarnation");
    }
    if let Some(e) = &record.edit
        && !matches!(&e.body, Body::Edit { incarnation: i, .. } if *i == incarnation)
    {
        return bad("its edit names another incarnation");
    }
    Ok(())
}

/// Grants per principal: what each holds.
type Held = BTreeMap<String, BTreeSet<(Action, Resource)>>;

/// What the catalogue's entries allow, as every node computes it from the same records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Counted grants per principal.
    grants: Held,
    /// Counted tokens by id.
    tokens: BTreeMap<String, TokenRecord>,
    /// Counted functions by name: the incarnation and the definition in force.
    functions: BTreeMap<String, (Incarnation, FunctionDef)>,
}

/// True when `signer` is admin over every namespace `def` touches.
fn authorises_function(signer: &Signer, def: &FunctionDef, admins: &Held) -> bool {
    def.namespaces().iter().all(|ns| authorises(signer, &Resource::of_namespace(ns), admins))
}

fn authorises(signer: &Signer, over: &Resource, admins: &Held) -> bool {
    signer.superuser
        || admins
            .get(&signer.principal)
            .is_some_and(|held| held.iter().any(|(a, r)| *a == Action::Admin && r.includes(over)))
}

/// The least set of grants closed under "signed by a superuser or an admin in the set".
fn counted_grants<'r>(candidates: impl Iterator<Item = &'r Record> + Clone) -> Held {
    let mut counted: Held = BTreeMap::new();
    loop {
        let mut grew = false;
        for record in candidates.clone() {
            let Entry::Grant(g) = record.entry() else { continue };
            let key = (g.action, g.resource.clone());
            if counted.get(&g.principal).is_some_and(|s| s.contains(&key)) {
                continue;
            }
            if authorises(&record.create.by, &g.resource, &counted) {
                counted.entry(g.principal.clone()).or_default().insert(key);
                grew = true;
            }
        }
        if !grew {
            return counted;
        }
    }
}

impl Access {
    /// What `records` allow.
    pub fn of(records: &Records) -> Access {
        let ever = counted_grants(records.0.values());
        let deleted = |r: &Record| {
            r.delete.as_ref().is_some_and(|d| match r.entry() {
                Entry::Grant(g) => authorises(&d.by, &g.resource, &ever),
                Entry::Token(t) => d.by.superuser || d.by.principal == t.principal,
                Entry::Function(f) => authorises_function(&d.by, f, &ever),
            })
        };
        let live: Vec<&Record> = records.0.values().filter(|r| !deleted(r)).collect();
        let grants = counted_grants(live.iter().copied());
        let tokens = live
            .iter()
            .filter_map(|r| match r.entry() {
                Entry::Token(t) if r.create.by.superuser || r.create.by.principal == t.principal => {
                    Some((t.id.clone(), t.clone()))
                }
                _ => None,
            })
            .collect();
        let mut functions: BTreeMap<String, (Incarnation, FunctionDef, u64)> = BTreeMap::new();
        for r in &live {
            let Entry::Function(created) = r.entry() else { continue };
            if !authorises_function(&r.create.by, created, &grants) {
                continue;
            }
            let def = match (&r.edit, r.latest()) {
                (Some(e), Entry::Function(edited)) if authorises_function(&e.by, edited, &grants) => edited,
                _ => created,
            };
            // Two live incarnations of one name (created apart): the later created wins.
            let incarnation = r.create.body.incarnation();
            let newer = functions.get(&created.name).is_none_or(|(i, _, at)| (r.create.at_ms, incarnation) > (*at, *i));
            if newer {
                functions.insert(created.name.clone(), (incarnation, def.clone(), r.create.at_ms));
            }
        }
        let functions = functions.into_iter().map(|(name, (i, def, _))| (name, (i, def))).collect();
        Access { grants, tokens, functions }
    }

    /// The functions in force, by name: incarnation and definition.
    pub fn functions(&self) -> &BTreeMap<String, (Incarnation, FunctionDef)> {
        &self.functions
    }

    /// True when `principal` is admin over every namespace `def` touches.
    pub fn administers_function(&self, principal: &str, def: &FunctionDef) -> bool {
        let signer = Signer { principal: principal.to_string(), superuser: false };
        authorises_function(&signer, def, &self.grants)
    }

    /// True when `principal` may do `action` in namespace `ns` (admin allows all three).
    pub fn allows(&self, principal: &str, action: Action, ns: &NamespaceName) -> bool {
        self.grants
            .get(principal)
            .is_some_and(|held| held.iter().any(|(a, r)| (*a == action || *a == Action::Admin) && r.covers(ns)))
    }

    /// True when `principal` is admin over all of `resource`.
    pub fn administers(&self, principal: &str, resource: &Resource) -> bool {
        let signer = Signer { principal: principal.to_string(), superuser: false };
        authorises(&signer, resource, &self.grants)
    }

    /// True when `principal` holds any grant covering `ns` (it may see the namespace).
    pub fn sees(&self, principal: &str, ns: &NamespaceName) -> bool {
        self.grants.get(principal).is_some_and(|held| held.iter().any(|(_, r)| r.covers(ns)))
    }

    /// True when `principal` holds any grant at all.
    pub fn holds_any(&self, principal: &str) -> bool {
        self.grants.get(principal).is_some_and(|held| !held.is_empty())
    }

    /// The counted grants of `principal`.
    pub fn grants_of(&self, principal: &str) -> impl Iterator<Item = &(Action, Resource)> {
        self.grants.get(principal).into_iter().flatten()
    }

    /// The counted token with this id.
    pub fn token(&self, id: &str) -> Option<&TokenRecord> {
        self.tokens.get(id)
    }

    /// True when the grant of `record` counts.
    pub fn counts(&self, grant: &Grant) -> bool {
        self.grants.get(&grant.principal).is_some_and(|s| s.contains(&(grant.action, grant.resource.clone())))
    }
}

#[cfg(test)]
mod tests;
