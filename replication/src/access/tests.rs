use super::*;
use crate::function::FunctionDef;

/// Accepts a signature that reads "ok".
#[derive(Debug)]
struct Fake;

impl Verify for Fake {
    fn verify(&self, signed: &Signed) -> Result<(), String> {
        if signed.signature == b"ok" { Ok(()) } else { Err("not signed".into()) }
    }
}

fn signer(name: &str) -> Signer {
    Signer { principal: name.into(), superuser: name == "root" }
}

fn signed(by: &str, body: Body) -> Signed {
    Signed { body, by: signer(by), at_ms: 1, cert: Vec::new(), signature: b"ok".to_vec() }
}

fn grant(by: &str, incarnation: u64, principal: &str, action: Action, resource: &str) -> Signed {
    let g = Grant { principal: principal.into(), action, resource: Resource::parse(resource).unwrap() };
    signed(by, Body::Create { incarnation: Incarnation(incarnation), entry: Entry::Grant(g) })
}

fn delete(by: &str, incarnation: u64) -> Signed {
    signed(by, Body::Delete { incarnation: Incarnation(incarnation) })
}

fn ns(name: &str) -> NamespaceName {
    NamespaceName::parse(name).unwrap()
}

fn records(edits: Vec<Signed>) -> Records {
    let mut r = Records::default();
    for e in edits {
        r.apply(e, &Fake).unwrap();
    }
    r
}

#[test]
fn a_grant_counts_when_a_superuser_or_a_tenant_admin_signed_it() {
    let r = records(vec![
        grant("root", 1, "alice", Action::Admin, "acme"),
        grant("alice", 2, "bob", Action::Produce, "acme/sensors"),
        // Alice administers acme only.
        grant("alice", 3, "bob", Action::Produce, "other"),
        // Bob is no admin.
        grant("bob", 4, "bob", Action::Consume, "acme"),
    ]);
    let access = Access::of(&r);
    assert!(access.allows("bob", Action::Produce, &ns("acme/sensors")));
    assert!(!access.allows("bob", Action::Produce, &ns("acme/other")));
    assert!(!access.allows("bob", Action::Produce, &ns("other/x")));
    assert!(!access.allows("bob", Action::Consume, &ns("acme/sensors")));
    // Admin allows produce and consume in every namespace of its tenant.
    assert!(access.allows("alice", Action::Consume, &ns("acme/anything")));
    assert!(access.administers("alice", &Resource::parse("acme/x").unwrap()));
    assert!(!access.administers("bob", &Resource::parse("acme/sensors").unwrap()));
    assert!(access.sees("bob", &ns("acme/sensors")));
    assert!(!access.sees("bob", &ns("acme/other")));
}

#[test]
fn a_circle_of_admins_without_a_superuser_at_its_root_counts_for_nothing() {
    let r =
        records(vec![grant("alice", 1, "bob", Action::Admin, "acme"), grant("bob", 2, "alice", Action::Admin, "acme")]);
    let access = Access::of(&r);
    assert!(!access.holds_any("alice"));
    assert!(!access.holds_any("bob"));
}

#[test]
fn a_deletion_stays_whatever_arrives_later_and_whatever_the_order() {
    let create = grant("root", 1, "bob", Action::Produce, "acme/s");
    let revoke = delete("root", 1);
    let mut a = records(vec![create.clone()]);
    let mut b = records(vec![create.clone(), revoke.clone()]);
    assert!(!Access::of(&b).holds_any("bob"));
    // A node that still has only the creation sends it again: nothing comes back.
    let (changed, refused) = b.merge(&a, &Fake);
    assert!(changed.is_empty() && refused.is_empty());
    assert!(!Access::of(&b).holds_any("bob"));
    // The deletion reaches the other node.
    let (changed, _) = a.merge(&b, &Fake);
    assert!(!changed.is_empty());
    assert_eq!(a, b);
    // Creating again is a new incarnation: the old deletion does not touch it.
    a.apply(grant("root", 2, "bob", Action::Produce, "acme/s"), &Fake).unwrap();
    assert!(Access::of(&a).allows("bob", Action::Produce, &ns("acme/s")));
}

#[test]
fn concurrent_deletions_and_creations_converge() {
    let base = vec![grant("root", 1, "alice", Action::Admin, "acme"), grant("root", 2, "bob", Action::Admin, "acme")];
    // Each admin revokes the other while they are apart; root grants carol meanwhile.
    let mut x = records(base.clone());
    let mut y = records(base.clone());
    let mut z = records(base);
    x.apply(delete("alice", 2), &Fake).unwrap();
    y.apply(delete("bob", 1), &Fake).unwrap();
    z.apply(grant("root", 3, "carol", Action::Consume, "acme"), &Fake).unwrap();
    let mut one = x.clone();
    one.merge(&y, &Fake);
    one.merge(&z, &Fake);
    let mut two = z.clone();
    two.merge(&y, &Fake);
    two.merge(&x, &Fake);
    assert_eq!(one, two);
    let access = Access::of(&one);
    // Both were admins once, so both deletions count.
    assert!(!access.holds_any("alice") && !access.holds_any("bob"));
    assert!(access.allows("carol", Action::Consume, &ns("acme/s")));
}

#[test]
fn revoking_an_admin_removes_the_grants_it_made() {
    let mut r = records(vec![
        grant("root", 1, "alice", Action::Admin, "acme"),
        grant("alice", 2, "bob", Action::Produce, "acme/s"),
    ]);
    assert!(Access::of(&r).allows("bob", Action::Produce, &ns("acme/s")));
    r.apply(delete("root", 1), &Fake).unwrap();
    assert!(!Access::of(&r).holds_any("bob"));
}

#[test]
fn a_deletion_by_someone_without_authority_does_not_count() {
    let r = records(vec![grant("root", 1, "bob", Action::Produce, "acme/s"), delete("mallory", 1)]);
    assert!(Access::of(&r).allows("bob", Action::Produce, &ns("acme/s")));
}

#[test]
fn parts_that_do_not_verify_or_do_not_fit_are_refused() {
    let mut ours = Records::default();
    let mut bad = grant("root", 1, "bob", Action::Admin, "acme");
    bad.signature = b"forged".to_vec();
    let mut theirs = Records::default();
    theirs.0.insert(Incarnation(1), Record { create: bad, delete: None, edit: None });
    // A deletion naming another incarnation than the record's.
    let mixed =
        Record { create: grant("root", 2, "bob", Action::Admin, "acme"), delete: Some(delete("root", 3)), edit: None };
    theirs.0.insert(Incarnation(2), mixed);
    let (changed, refused) = ours.merge(&theirs, &Fake);
    assert!(changed.is_empty());
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused[0].contains("not signed"), "{refused:?}");
    assert!(refused[1].contains("another incarnation"), "{refused:?}");
    assert!(ours.is_empty());
    // Deleting what this node does not hold is an error, not a silent success.
    assert_eq!(ours.apply(delete("root", 9), &Fake), Err(EntryError::Unknown(Incarnation(9))));
}

#[test]
fn a_token_counts_when_its_principal_or_a_superuser_made_it() {
    let token = |id: &str, principal: &str| TokenRecord {
        id: id.into(),
        principal: principal.into(),
        salt: [0; 16],
        hash: [0; 32],
        expires_ms: None,
    };
    let create = |by: &str, i: u64, t: TokenRecord| {
        signed(by, Body::Create { incarnation: Incarnation(i), entry: Entry::Token(t) })
    };
    let mut r = records(vec![
        create("root", 1, token("t1", "alice")),
        create("alice", 2, token("t2", "alice")),
        create("mallory", 3, token("t3", "alice")),
    ]);
    let access = Access::of(&r);
    assert!(access.token("t1").is_some() && access.token("t2").is_some());
    assert!(access.token("t3").is_none());
    r.apply(delete("mallory", 2), &Fake).unwrap();
    assert!(Access::of(&r).token("t2").is_some());
    r.apply(delete("alice", 2), &Fake).unwrap();
    assert!(Access::of(&r).token("t2").is_none());
}

#[test]
fn resources_parse_and_cover() {
    assert_eq!(Resource::parse("acme").unwrap().to_string(), "acme");
    assert_eq!(Resource::parse("acme/s").unwrap().to_string(), "acme/s");
    assert!(Resource::parse("a/b/c").is_err());
    assert!(Resource::parse("").is_err());
    assert!(Resource::parse("acme").unwrap().covers(&ns("acme/s")));
    assert!(!Resource::parse("acme/t").unwrap().covers(&ns("acme/s")));
    assert!(!Resource::parse("acm").unwrap().covers(&ns("acme/s")));
    assert!(Resource::parse("acme").unwrap().includes(&Resource::parse("acme/x").unwrap()));
    assert!(!Resource::parse("acme/x").unwrap().includes(&Resource::parse("acme").unwrap()));
}

fn function(by: &str, incarnation: u64, at_ms: u64, def: FunctionDef) -> Signed {
    let mut s = signed(by, Body::Create { incarnation: Incarnation(incarnation), entry: Entry::Function(def) });
    s.at_ms = at_ms;
    s
}

fn edit(by: &str, incarnation: u64, at_ms: u64, def: FunctionDef) -> Signed {
    let mut s = signed(by, Body::Edit { incarnation: Incarnation(incarnation), entry: Entry::Function(def) });
    s.at_ms = at_ms;
    s
}

fn def(name: &str, input: &str, output: &str, params: &[(&str, &str)]) -> FunctionDef {
    FunctionDef {
        name: name.into(),
        module: [1; 32],
        inputs: vec![input.into()],
        outputs: vec![output.into()],
        nodes: None,
        start: crate::function::Start::Earliest,
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        paused: false,
    }
}

#[test]
fn a_function_counts_when_its_signer_administers_every_namespace_it_touches() {
    let norm = def("acme/fx/norm", "acme/raw/t", "acme/clean/t", &[]);
    let leak = def("acme/fx/leak", "acme/raw/t", "globex/x/t", &[]);
    let r = records(vec![
        grant("root", 1, "alice", Action::Admin, "acme"),
        function("alice", 10, 5, norm.clone()),
        function("alice", 11, 5, leak),
        function("bob", 12, 5, def("acme/fx/bob", "acme/raw/t", "acme/clean/u", &[])),
    ]);
    let access = Access::of(&r);
    let names: Vec<&String> = access.functions().keys().collect();
    assert_eq!(names, ["acme/fx/norm"], "alice cannot write to globex; bob is no admin");
    assert_eq!(access.functions()["acme/fx/norm"], (Incarnation(10), norm));
}

#[test]
fn the_later_edit_wins_in_any_order_and_an_edit_cannot_rename() {
    let v1 = def("acme/fx/norm", "acme/raw/t", "acme/clean/t", &[("scale", "1")]);
    let v2 = def("acme/fx/norm", "acme/raw/t", "acme/clean/t", &[("scale", "2")]);
    let v3 = def("acme/fx/norm", "acme/raw/t", "acme/clean/t", &[("scale", "3")]);
    let base = vec![grant("root", 1, "alice", Action::Admin, "acme"), function("alice", 10, 5, v1)];
    let mut a = records(base.clone());
    let mut b = records(base);
    a.apply(edit("alice", 10, 30, v3.clone()), &Fake).unwrap();
    b.apply(edit("alice", 10, 20, v2), &Fake).unwrap();
    let (mut ab, mut ba) = (a.clone(), b.clone());
    ab.merge(&b, &Fake);
    ba.merge(&a, &Fake);
    assert_eq!(ab, ba);
    assert_eq!(Access::of(&ab).functions()["acme/fx/norm"].1, v3);
    // An edit must keep the function's name.
    let renamed = def("acme/fx/other", "acme/raw/t", "acme/clean/t", &[]);
    assert!(matches!(a.apply(edit("alice", 10, 40, renamed), &Fake), Err(EntryError::Malformed(..))));
    // A deleted function is gone, whatever edit comes later.
    a.apply(delete("alice", 10), &Fake).unwrap();
    a.apply(edit("alice", 10, 50, def("acme/fx/norm", "acme/raw/t", "acme/clean/t", &[])), &Fake).unwrap();
    assert!(Access::of(&a).functions().is_empty());
}

#[test]
fn an_edit_without_authority_leaves_the_function_as_created() {
    let v1 = def("acme/fx/norm", "acme/raw/t", "acme/clean/t", &[]);
    let moved = def("acme/fx/norm", "acme/raw/t", "globex/x/t", &[]);
    let r = records(vec![
        grant("root", 1, "alice", Action::Admin, "acme"),
        function("alice", 10, 5, v1.clone()),
        edit("alice", 10, 9, moved),
    ]);
    assert_eq!(Access::of(&r).functions()["acme/fx/norm"].1, v1);
}

#[test]
fn of_two_functions_created_apart_under_one_name_the_later_runs() {
    let older = def("acme/fx/norm", "acme/raw/t", "acme/clean/t", &[("v", "old")]);
    let newer = def("acme/fx/norm", "acme/raw/t", "acme/clean/t", &[("v", "new")]);
    for order in [[0, 1], [1, 0]] {
        let parts = [function("root", 20, 5, older.clone()), function("root", 10, 8, newer.clone())];
        let r = records(order.iter().map(|i| parts[*i].clone()).collect());
        assert_eq!(Access::of(&r).functions()["acme/fx/norm"], (Incarnation(10), newer.clone()));
    }
}
