use rill_replication::{
    access::{Grant, Incarnation},
    namespace::Edit,
};
use serde::de::{self, Visitor};

use super::*;
use crate::protocol::{ConsumerOptions, SeekTarget, SeqMode, StartPosition};

#[derive(Debug)]
struct AcceptAll;

impl Verify for AcceptAll {
    fn verify(&self, _: &Signed) -> Result<(), String> {
        Ok(())
    }
}

fn principal(name: &str, superuser: bool) -> Principal {
    Principal { name: name.into(), superuser }
}

fn signed(by: &str, body: Body) -> Signed {
    Signed {
        body,
        by: Signer { principal: by.into(), superuser: by == "root" },
        at_ms: 1,
        cert: Vec::new(),
        signature: Vec::new(),
    }
}

fn grant(incarnation: u64, who: &str, action: Action, resource: &str) -> Signed {
    let g = Grant { principal: who.into(), action, resource: Resource::parse(resource).unwrap() };
    signed("root", Body::Create { incarnation: Incarnation(incarnation), entry: Entry::Grant(g) })
}

/// Alice may produce to and consume from acme/s and administers tenant "alice-co".
fn authz() -> Authz {
    let mut config = ConfigDoc::default();
    for g in [
        grant(1, "alice", Action::Produce, "acme/s"),
        grant(2, "alice", Action::Consume, "acme/s"),
        grant(3, "alice", Action::Admin, "alice-co"),
        grant(4, "bob", Action::Produce, "other/x"),
    ] {
        config.apply_signed(g, &AcceptAll).unwrap();
    }
    let authz = Authz::new(Vec::new(), true);
    authz.update(&config);
    authz
}

/// Every variant name of `Request`, from its serde derive.
fn request_variants() -> &'static [&'static str] {
    struct Names(Option<&'static [&'static str]>);
    impl<'de> de::Deserializer<'de> for &mut Names {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not an enum"))
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = Some(variants);
            Err(de::Error::custom("names taken"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map struct identifier ignored_any
        }
    }
    let mut names = Names(None);
    let _ = <Request as serde::Deserialize>::deserialize(&mut names);
    names.0.expect("Request is an enum")
}

/// A function alice signs: in alice-co, which she administers, writing to "other".
fn alice_function() -> Signed {
    let def = rill_replication::function::FunctionDef {
        name: "alice-co/fx/leak".into(),
        module: [0; 32],
        inputs: vec!["alice-co/in/t".into()],
        outputs: vec!["other/x/t".into()],
        nodes: None,
        start: rill_replication::function::Start::Earliest,
        params: Vec::new(),
        paused: false,
    };
    let mut s = signed("alice", Body::Create { incarnation: Incarnation(30), entry: Entry::Function(def) });
    s.by.superuser = false;
    s
}

/// One request of each variant, each touching what alice holds no grant for (tenant
/// "other"), or needing a grant she lacks.
fn rows() -> Vec<(Request, Option<&'static str>)> {
    let topic = || "other/x/t".to_string();
    let someone_elses_grant = grant(9, "alice", Action::Admin, "other");
    let mut alice_signs = someone_elses_grant.clone();
    alice_signs.by = Signer { principal: "alice".into(), superuser: false };
    let stream = Some("other/x");
    vec![
        (Request::OpenProducer { topic: topic(), producer: "p".into(), seqs: SeqMode::Assigned }, None),
        (Request::Produce { topic: topic(), producer: "p".into(), epoch: 0, messages: Vec::new() }, None),
        (
            Request::Subscribe {
                topic: topic(),
                subscription: "s".into(),
                start: StartPosition::Earliest,
                options: ConsumerOptions::default(),
            },
            None,
        ),
        (Request::Ack { offsets: vec![1] }, stream),
        (Request::AckCumulative { offset: 1 }, stream),
        (Request::Nack { offsets: vec![1] }, stream),
        (Request::Seek { topic: topic(), subscription: "s".into(), target: SeekTarget::Earliest }, None),
        (Request::DeleteSubscription { topic: topic(), subscription: "s".into() }, None),
        (Request::ListConflicts { topic: Some(topic()) }, None),
        (Request::NsEdit { namespace: "other/x".into(), edit: Edit::Create }, None),
        // Alice administers alice-co, not acme.
        (Request::NsEdit { namespace: "acme/s".into(), edit: Edit::RetentionAge(Some(1)) }, None),
        // Signed by alice, granting herself admin over a tenant she does not administer.
        (Request::CatalogueEdit(alice_signs), None),
        // Signed by someone else: refused whatever it says.
        (Request::CatalogueEdit(someone_elses_grant), None),
        (Request::PutBlob { namespace: "other/x".into(), bytes: b"(module)".to_vec() }, None),
        // A function in her tenant that writes to a tenant she does not administer.
        (Request::CatalogueEdit(alice_function()), None),
        // Revoking bob's grant in a tenant she does not administer.
        (Request::CatalogueEdit(signed("alice", Body::Delete { incarnation: Incarnation(4) })), None),
    ]
}

#[test]
fn every_request_variant_is_refused_without_its_grant() {
    let authz = authz();
    let alice = principal("alice", false);
    let nobody = principal("nobody", false);
    let root = principal("root", true);
    let rows = rows();
    for (request, stream) in &rows {
        let stream = stream.map(|s| NamespaceName::parse(s).unwrap());
        let refused = authz.check(&alice, request, stream.as_ref());
        assert!(matches!(refused, Err(NodeError::Forbidden(_))), "{request:?}: {refused:?}");
        let message = refused.unwrap_err().to_string();
        assert!(message.contains("'alice'"), "the refusal names the principal: {message}");
        assert!(matches!(authz.check(&nobody, request, stream.as_ref()), Err(NodeError::Forbidden(_))));
        // The refusal comes from the missing grant: a superuser passes the same check.
        if !matches!(request, Request::CatalogueEdit(_)) {
            assert!(authz.check(&root, request, stream.as_ref()).is_ok(), "{request:?}");
        }
    }
    // A principal without any grant may not list what the node holds.
    for request in [Request::ListTopics, Request::Stats, Request::NsGet, Request::ListConflicts { topic: None }] {
        assert!(matches!(authz.check(&nobody, &request, None), Err(NodeError::Forbidden(_))), "{request:?}");
        assert!(authz.check(&alice, &request, None).is_ok(), "{request:?}: filtered to her grants, not refused");
    }
    // Anyone may ask who they are.
    assert!(authz.check(&nobody, &Request::WhoAmI { token: None }, None).is_ok());
    // Every variant has a row: a new one fails here until it gets one.
    let covered: std::collections::BTreeSet<String> = rows
        .iter()
        .map(|(r, _)| variant(r))
        .chain(["ListTopics", "Stats", "NsGet", "ListConflicts", "WhoAmI"].map(String::from))
        .collect();
    let missing: Vec<&&str> = request_variants().iter().filter(|v| !covered.contains(**v)).collect();
    assert!(missing.is_empty(), "request variants without a row in this table: {missing:?}");
    let counted = authz.refusals(&root);
    assert!(counted.iter().any(|(p, n)| p == "alice" && *n >= rows.len() as u64), "{counted:?}");
}

#[test]
fn grants_allow_what_they_cover() {
    let authz = authz();
    let alice = principal("alice", false);
    let produce = Request::Produce { topic: "acme/s/t".into(), producer: "p".into(), epoch: 0, messages: Vec::new() };
    assert!(authz.check(&alice, &produce, None).is_ok());
    let ack = Request::Ack { offsets: vec![1] };
    assert!(authz.check(&alice, &ack, Some(&NamespaceName::parse("acme/s").unwrap())).is_ok());
    // An ack anywhere but on a subscription stream is malformed, whoever sends it.
    assert!(matches!(authz.check(&alice, &ack, None), Err(NodeError::Malformed(_))));
    let edit = Request::NsEdit { namespace: "alice-co/new".into(), edit: Edit::Create };
    assert!(authz.check(&alice, &edit, None).is_ok());
    let g =
        Grant { principal: "carol".into(), action: Action::Consume, resource: Resource::parse("alice-co/a").unwrap() };
    let mut by_alice = signed("alice", Body::Create { incarnation: Incarnation(20), entry: Entry::Grant(g) });
    by_alice.by.superuser = false;
    assert!(authz.check(&alice, &Request::CatalogueEdit(by_alice), None).is_ok());
    assert!(authz.sees(&alice, &NamespaceName::parse("acme/s").unwrap()));
    assert!(!authz.sees(&alice, &NamespaceName::parse("other/x").unwrap()));
}

#[test]
fn node_certificates_and_refused_superusers_do_not_get_in() {
    let dir = tempfile::tempdir().unwrap();
    certs::create_mesh(dir.path(), &["edge"]).unwrap();
    let load = |stem: &str| certs::Identity::node(dir.path(), stem).load().unwrap().chain.remove(0);
    let strict = Authz::new(Vec::new(), false);
    let err = strict.admit(Some(&load("edge"))).unwrap_err();
    assert!(err.contains("may only replicate"), "{err}");
    let err = strict.admit(Some(&load("client"))).unwrap_err();
    assert!(err.contains("auth.superusers = false"), "{err}");
    let open = Authz::new(Vec::new(), true);
    assert_eq!(open.admit(Some(&load("client"))), Ok(principal("admin", true)));
    assert!(open.admit(None).is_err());
}

#[test]
fn a_token_works_until_revoked_or_expired_and_only_with_its_secret() {
    let (token, record) = new_token("alice", Some(5_000), &[7; 64]);
    let mut config = ConfigDoc::default();
    let create = Body::Create { incarnation: Incarnation(1), entry: Entry::Token(record.clone()) };
    config.apply_signed(signed("root", create), &AcceptAll).unwrap();
    let authz = authz();
    authz.update(&config);
    assert_eq!(authz.token(&token, 1_000).unwrap(), principal("alice", false));
    assert!(authz.token(&token, 5_000).unwrap_err().to_string().contains("expired"));
    let mut wrong = token.clone();
    wrong.replace_range(token.len() - 2.., "00");
    assert!(authz.token(&wrong, 1_000).is_err());
    assert!(authz.token("rill_nonsense", 1_000).is_err());
    assert!(!format!("{config:?}").contains(&token[22..]), "the catalogue never holds the secret");
    config.apply_signed(signed("root", Body::Delete { incarnation: Incarnation(1) }), &AcceptAll).unwrap();
    authz.update(&config);
    assert!(authz.token(&token, 1_000).is_err());
}

#[test]
fn the_ca_verifier_takes_a_principal_signature_only() {
    let dir = tempfile::tempdir().unwrap();
    certs::create_mesh(dir.path(), &["edge"]).unwrap();
    certs::issue_principal(dir.path(), "alice", "alice", false).unwrap();
    let load = |stem: &str| certs::Identity::node(dir.path(), stem).load().unwrap();
    let alice = load("alice");
    let verifier = CaVerifier { ca: alice.ca.clone() };
    let g = Grant { principal: "alice".into(), action: Action::Admin, resource: Resource::parse("acme").unwrap() };
    let body = Body::Create { incarnation: Incarnation(1), entry: Entry::Grant(g) };
    let sign_as = |id: &certs::LoadedIdentity, by: Signer| {
        let message = Signed::message(&body, &by, 1_800_000_000_000);
        let signature = certs::sign(&id.key, &message).unwrap();
        Signed { body: body.clone(), by, at_ms: 1_800_000_000_000, cert: id.chain[0].to_vec(), signature }
    };
    let honest = sign_as(&alice, Signer { principal: "alice".into(), superuser: false });
    assert_eq!(verifier.verify(&honest), Ok(()));
    // Alice claiming to be a superuser, or someone else: her certificate says otherwise.
    let bragging = sign_as(&alice, Signer { principal: "alice".into(), superuser: true });
    assert!(verifier.verify(&bragging).unwrap_err().contains("not the signer"));
    let posing = sign_as(&alice, Signer { principal: "admin".into(), superuser: true });
    assert!(verifier.verify(&posing).is_err());
    // A node's key signs nothing that counts, whatever it claims.
    let node = sign_as(&load("edge"), Signer { principal: "admin".into(), superuser: true });
    assert!(verifier.verify(&node).unwrap_err().contains("may only replicate"));
    // Changing a signed entry breaks its signature.
    let mut altered = honest.clone();
    altered.at_ms += 1;
    assert!(verifier.verify(&altered).unwrap_err().contains("bad signature"));
}
