//! Principals and grants with real processes (issue 16): tenants cannot reach each other,
//! a revoked grant stops a connected producer and consumer, a grant made during a
//! partition holds on the other side after the heal, and a node's certificate is no
//! client's.
use std::time::Duration;

use rill_node::{
    client::{Client, ClientError, Outgoing},
    protocol::{ErrorCode, StartPosition},
};
use tokio::time::Instant;

use crate::{
    mesh::{MeshDir, TOPIC, await_namespace, create_namespace},
    partition::Firewall,
    support::{TestNode, run, text},
};

/// A client of `node` as the identity `identity` in `node`'s certificate directory.
async fn client_as(node: &TestNode, identity: &str) -> Client {
    Client::connect(&node.options().with_identity(identity)).await.expect("connect")
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, ClientError>, what: &str) -> String {
    match result {
        Err(ClientError::Refused { code: ErrorCode::Forbidden, message }) => message,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

/// Runs `rill` against `node` as `identity` and expects success.
fn cli_ok(node: &TestNode, args: &[&str]) -> String {
    let out = node.cli(args, "");
    assert!(out.status.success(), "rill {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// `rill certs issue` for `name` into `certs`.
fn issue(node: &TestNode, name: &str, certs: &str) {
    let args: Vec<String> = ["certs", "issue", "--name", name, "--dir", certs].map(String::from).to_vec();
    let out = run(&node.cwd, &args, "");
    assert!(out.status.success(), "certs issue: {}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_apart_grants_cannot_be_self_made_and_revoked_clients_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(dir.path(), "solo");
    let certs = node.certs.display().to_string();
    for name in ["alice", "bob"] {
        issue(&node, name, &certs);
    }
    for ns in ["acme/sensors", "globex/plant"] {
        cli_ok(&node, &["ns", "create", ns]);
    }
    cli_ok(&node, &["grant", "alice", "produce", "acme/sensors"]);
    cli_ok(&node, &["grant", "alice", "consume", "acme"]);
    cli_ok(&node, &["grant", "bob", "produce", "globex"]);

    let alice = client_as(&node, "alice").await;
    let mut p = alice.producer(TOPIC, "dev".into()).await.expect("alice produces to her tenant");
    p.send(vec![Outgoing::payload("a1")]).await.expect("send");
    p.flush().await.expect("acked");

    // Tenant A cannot write or read tenant B, nor see its topics.
    let bob = client_as(&node, "bob").await;
    let mut bp = bob.producer("globex/plant/t", "b".into()).await.expect("bob produces to his tenant");
    bp.send(vec![Outgoing::payload("b1")]).await.expect("send");
    bp.close().await.expect("acked");
    let why = forbidden(alice.producer("globex/plant/t", "dev".into()).await, "alice writes to globex");
    assert!(why.contains("'alice'") && why.contains("produce") && why.contains("globex/plant"), "{why}");
    let consumed = alice.subscribe("globex/plant/t", "spy", StartPosition::Earliest).await.map(|_| ());
    let why = forbidden(consumed, "alice reads globex");
    assert!(why.contains("consume"), "{why}");
    let topics = alice.list_topics().await.expect("alice lists what she may see");
    assert_eq!(topics.iter().map(|t| t.topic.as_str()).collect::<Vec<_>>(), vec![TOPIC]);
    // Bob may produce, not consume, in his own tenant.
    let consumed = bob.subscribe("globex/plant/t", "s", StartPosition::Earliest).await;
    forbidden(consumed.map(|_| ()), "bob consumes without a consume grant");

    // Nor can alice grant herself anything.
    let out = node.cli(&["grant", "alice", "admin", "acme", "--identity", "alice"], "");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not admin of 'acme'"), "{}", text(&out.stderr));
    let out = node.cli(&["revoke", "bob", "produce", "globex", "--identity", "alice"], "");
    assert!(!out.status.success(), "alice revoked bob's grant");

    // Her producer names are hers: stored as alice/dev.
    let mut sub = alice.subscribe(TOPIC, "s", StartPosition::Earliest).await.expect("sub");
    let got = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("in time").expect("delivery");
    assert_eq!(&*got.expect("a message").message.id.producer.0, "alice/dev");
    drop(sub);

    // A revoked grant stops the connected producer at its next request.
    cli_ok(&node, &["revoke", "alice", "produce", "acme/sensors"]);
    let mut refused = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused.is_none() && Instant::now() < deadline {
        match p.send(vec![Outgoing::payload("after")]).await.and(p.flush().await) {
            Ok(_) => {}
            Err(e) => refused = Some(e),
        }
    }
    let refused = refused.expect("the producer was stopped");
    assert!(
        matches!(&refused, ClientError::Refused { code: ErrorCode::Forbidden, .. }),
        "the producer was stopped by its grant: {refused:?}"
    );
    let grants = cli_ok(&node, &["grants", "list"]);
    assert!(grants.lines().any(|l| l.contains("alice") && l.contains("produce") && l.contains("revoked")), "{grants}");
    let stats = node.client().await.stats().await.expect("stats");
    assert!(stats.refusals.iter().any(|(p, n)| p == "alice" && *n >= 3), "{:?}", stats.refusals);

    // A revoked consume grant stops a connected consumer at its next delivery, acked or not.
    let mut watcher = alice.subscribe(TOPIC, "watch", StartPosition::Latest).await.expect("watch");
    cli_ok(&node, &["revoke", "alice", "consume", "acme"]);
    let admin = node.client().await;
    let mut ap = admin.producer(TOPIC, "ops".into()).await.expect("superuser producer");
    ap.send(vec![Outgoing::payload("after the revocation")]).await.expect("send");
    ap.close().await.expect("acked");
    let next = tokio::time::timeout(Duration::from_secs(10), watcher.next()).await.expect("an answer in time");
    let why = forbidden(next, "a delivery after the revocation");
    assert!(why.contains("consume"), "{why}");

    // A node's certificate is no client's.
    let err = Client::connect(&node.options().with_identity("solo"))
        .await
        .expect("the handshake completes")
        .who_am_i(None)
        .await
        .expect_err("a node's certificate as a client");
    assert!(err.to_string().contains("connection lost"), "{err}");
    assert!(node.wait_for_log("a node certificate may only replicate"), "{}", node.log());
}

const A: (&str, &str) = ("ga", "127.0.0.7");
const B: (&str, &str) = ("gb", "127.0.0.8");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_made_during_a_partition_holds_on_the_other_side_after_the_heal_and_a_token_converges() {
    let mesh = MeshDir::on(&[A, B]);
    mesh.configure("ga", &["gb"], &[]);
    mesh.configure("gb", &[], &["ga"]);
    let (ga, gb) = (mesh.start("ga"), mesh.start("gb"));
    create_namespace(&ga, &["ga", "gb"]).await;
    let certs = mesh.certs().display().to_string();
    issue(&ga, "carol", &certs);
    await_namespace(&gb).await;

    let mut firewall = Firewall::new(16);
    firewall.cut_ips(A.1, B.1);
    cli_ok(&ga, &["grant", "carol", "produce", "acme/sensors"]);
    let token = cli_ok(&ga, &["tokens", "create", "--principal", "carol", "--expires", "1d"]);
    let token = token.trim().to_string();
    // Apart, gb knows nothing of it.
    let carol_b = client_as(&gb, "carol").await;
    forbidden(carol_b.producer(TOPIC, "c".into()).await, "carol on gb before the heal");
    assert!(carol_b.who_am_i(Some(&token)).await.is_err(), "gb knows the token before the heal");

    firewall.heal_ips(A.1, B.1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut producer = loop {
        match carol_b.producer(TOPIC, "c".into()).await {
            Ok(p) => break p,
            Err(e) => assert!(Instant::now() < deadline, "carol is still refused on gb after the heal: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    producer.send(vec![Outgoing::payload("c1")]).await.expect("send");
    producer.close().await.expect("acked");
    let (name, _, grants) = carol_b.who_am_i(Some(&token)).await.expect("the token works on gb");
    assert_eq!((name.as_str(), grants), ("carol", vec!["produce acme/sensors".to_string()]));

    // Revoked on gb, the token stops working on ga too.
    let id = token.split('_').nth(1).expect("token id").to_string();
    cli_ok(&gb, &["tokens", "revoke", &id]);
    let carol_a = client_as(&ga, "carol").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while carol_a.who_am_i(Some(&token)).await.is_ok() {
        assert!(Instant::now() < deadline, "the revocation never reached ga");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = cli_ok(&ga, &["tokens", "list"]);
    assert!(listed.contains(&id) && listed.contains("revoked"), "{listed}");
}
