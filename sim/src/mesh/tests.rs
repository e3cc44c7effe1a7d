//! The mesh library's own tests.
use rill_node::{
    client::{ClientError, Outgoing},
    protocol::ErrorCode,
};

use super::{timeline::pair, *};

const TOPIC: &str = "acme/sensors/temp";
const STEP: Duration = Duration::from_millis(10);

fn line(seed: u64) -> Mesh {
    Mesh::builder(seed)
        .edge("gw")
        .region("eu")
        .link("gw", "eu")
        .namespace("acme/sensors", ["gw", "eu"])
        .tick(STEP)
        .build()
        .unwrap()
}

/// A sensor writing `n` messages through `gw`, one a second, each until acknowledged.
fn sensor(mesh: &mut Mesh, n: u64) {
    mesh.client("sensor", move |ctx| async move {
        let mut p = ctx.producer("gw", TOPIC, "sensor-1").await?;
        for i in 0..n {
            p.send(vec![Outgoing::payload(format!("{i}"))]).await?;
            p.flush().await?;
            ctx.sleep(Duration::from_secs(1)).await;
        }
        Ok(())
    });
}

fn build_error(builder: MeshBuilder) -> String {
    builder.build().err().expect("an invalid mesh").to_string()
}

#[test]
fn an_invalid_mesh_is_refused_naming_the_problem() {
    let b = || Mesh::builder(1).edge("gw").region("eu");
    assert!(build_error(b().link("gw", "us")).contains(r#"no node named "us""#));
    assert!(build_error(b().link("gw", "eu").link("eu", "gw")).contains("declared twice"));
    assert!(build_error(b().link("gw", "gw")).contains("itself"));
    assert!(build_error(b().edge("gw")).contains(r#"node "gw" is declared twice"#));
    assert!(build_error(b().region("EU_1")).contains(r#""EU_1" is not a valid name"#));
    assert!(build_error(b().namespace("acme/sensors", ["gw", "ap"])).contains(r#"no node named "ap""#));
    assert!(build_error(b().namespace("acme", ["gw"])).contains("namespace \"acme\""));
    assert!(build_error(b().namespace("acme/x", Vec::<String>::new())).contains("at least one node"));
    assert!(build_error(Mesh::builder(1)).contains("no nodes"));
}

#[test]
fn isolation_and_partitions_heal_independently() {
    let nodes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let mut net = NetState::default();
    net.cut("b", "a", true);
    net.isolate("a", true);
    assert_eq!(net.wanted(&nodes), [pair("a", "b"), pair("a", "c")].into());
    net.isolate("a", false);
    assert_eq!(net.wanted(&nodes), [pair("a", "b")].into(), "the rejoin healed the partition");
    net.isolate("c", true);
    net.cut("a", "b", false);
    assert_eq!(net.wanted(&nodes), [pair("a", "c"), pair("b", "c")].into());
    net.cut("client", "c", true);
    assert!(net.wanted(&nodes).contains(&pair("c", "client")));
    net.heal();
    assert!(net.wanted(&nodes).is_empty());
}

#[test]
fn a_partition_holds_back_replication_and_the_repair_drains_it() {
    let mut mesh = line(1);
    sensor(&mut mesh, 30);
    let t = mesh.now();
    mesh.at(t + Duration::from_secs(5)).partition("gw", "eu");
    mesh.at(t + Duration::from_secs(25)).repair("gw", "eu");
    mesh.run_until(t + Duration::from_secs(24)).unwrap();
    let lag = mesh.lag("gw", "eu").unwrap();
    assert!(!lag.connected && lag.messages >= 15, "{lag:?}");
    assert!(lag.oldest_ms >= 15_000, "{lag:?}");
    let held = mesh.holdings("eu", TOPIC).unwrap().len();
    assert!((4..=7).contains(&held), "eu holds {held} during the partition");
    mesh.run_clients(Duration::from_secs(60)).unwrap();
    mesh.wait_converged("acme/sensors", Duration::from_secs(30)).unwrap();
    assert_eq!(mesh.lag("gw", "eu").unwrap(), Lag { connected: true, ..Lag::default() });
    let acked = mesh.history().acked(TOPIC);
    let held: Vec<MessageIdOf> = mesh.holdings("eu", TOPIC).unwrap().into_iter().map(|m| m.message.id).collect();
    assert_eq!(acked.len(), 30);
    assert_eq!(held, acked.into_iter().collect::<Vec<_>>());
}

type MessageIdOf = rill_storage::message::MessageId;

#[test]
fn convergence_waits_for_the_backlog_to_drain() {
    let mut mesh = line(10);
    let t = mesh.now();
    mesh.at(t).isolate("gw").set_latency("gw", "eu", Duration::from_millis(250));
    sensor(&mut mesh, 10);
    mesh.run_clients(Duration::from_secs(60)).unwrap();
    mesh.at(mesh.now()).rejoin("gw");
    let took = mesh.wait_converged("acme/sensors", Duration::from_secs(120)).unwrap();
    // A handshake and a batch over a 500 ms round trip: the backlog cannot be across
    // sooner.
    assert!(took >= Duration::from_secs(1), "converged after {took:?}");
    let lag = mesh.lag("gw", "eu").unwrap();
    assert_eq!((lag.messages, lag.connected), (0, true));
    assert_eq!(mesh.stats("eu").unwrap().topics.iter().find(|t| t.topic == TOPIC).unwrap().end_offset, 10);
}

#[test]
fn convergence_is_not_claimed_while_a_cluster_node_is_down() {
    let mut mesh = line(2);
    sensor(&mut mesh, 3);
    mesh.run_clients(Duration::from_secs(30)).unwrap();
    let t = mesh.now();
    mesh.at(t).crash("eu");
    let err = mesh.wait_converged("acme/sensors", Duration::from_secs(5)).unwrap_err();
    assert!(format!("{err:#}").contains("eu is down"), "{err:#}");
    mesh.at(mesh.now()).restart("eu");
    mesh.wait_converged("acme/sensors", Duration::from_secs(60)).unwrap();
    assert_eq!(mesh.holdings("eu", TOPIC).unwrap().len(), 3);
}

#[test]
fn a_failing_disk_refuses_writes_until_it_heals() {
    let mut mesh = line(3);
    let t = mesh.now();
    mesh.client("sensor", |ctx| async move {
        let mut p = ctx.producer("gw", TOPIC, "sensor-1").await?;
        ctx.sleep(Duration::from_secs(2)).await;
        p.send(vec![Outgoing::payload("while failing")]).await?;
        match p.flush().await {
            Err(ClientError::Refused { code: ErrorCode::Storage | ErrorCode::DiskFull, .. }) => {}
            other => return Err(format!("a failing disk answered {other:?}").into()),
        }
        ctx.sleep(Duration::from_secs(3)).await;
        let mut p = ctx.producer("gw", TOPIC, "sensor-1").await?;
        p.send(vec![Outgoing::payload("healed")]).await?;
        p.flush().await?;
        Ok(())
    });
    mesh.at(t + Duration::from_secs(1)).fail_disk_writes("gw", true);
    mesh.at(t + Duration::from_secs(4)).fail_disk_writes("gw", false);
    mesh.run_clients(Duration::from_secs(30)).unwrap();
    let held = mesh.holdings("gw", TOPIC).unwrap();
    assert_eq!(held.iter().map(|m| m.message.payload.as_slice()).collect::<Vec<_>>(), [b"healed"]);
}

#[test]
fn latency_and_loss_slow_a_link_and_heal() {
    let mut mesh = line(4);
    let t = mesh.now();
    mesh.client("sensor", |ctx| async move {
        let mut p = ctx.producer("gw", TOPIC, "sensor-1").await?;
        let mut took = Vec::new();
        for _ in 0..3 {
            let sent = ctx.now();
            p.send(vec![Outgoing::payload("x")]).await?;
            p.flush().await?;
            took.push(ctx.now() - sent);
            ctx.sleep(Duration::from_secs(5)).await;
        }
        let slow = took[1];
        if slow < Duration::from_millis(600) || took[2] >= Duration::from_millis(300) {
            return Err(format!("round trips {took:?} with 300 ms latency in the middle one").into());
        }
        Ok(())
    });
    mesh.at(t + Duration::from_secs(4)).set_latency("sensor", "gw", Duration::from_millis(300));
    mesh.at(t + Duration::from_secs(8)).set_latency("sensor", "gw", Duration::from_millis(10));
    mesh.at(t + Duration::from_secs(1)).set_loss("gw", "eu", 1000);
    mesh.run_until(t + Duration::from_secs(14)).unwrap();
    // Only the message written before the loss began reached eu.
    assert_eq!(mesh.holdings("eu", TOPIC).unwrap().len(), 1, "datagrams to eu got through a total loss");
    mesh.at(mesh.now()).set_loss("gw", "eu", 0);
    mesh.run_clients(Duration::from_secs(30)).unwrap();
    mesh.wait_converged("acme/sensors", Duration::from_secs(60)).unwrap();
    assert_eq!(mesh.holdings("eu", TOPIC).unwrap().len(), 3);
}

#[test]
fn a_seed_and_script_replay_identically() {
    let run = |seed| {
        let mut mesh = line(seed);
        sensor(&mut mesh, 5);
        let t = mesh.now();
        mesh.at(t + Duration::from_secs(2)).crash("eu").set_loss("sensor", "gw", 200);
        mesh.at(t + Duration::from_secs(3)).restart("eu");
        mesh.run_clients(Duration::from_secs(120)).unwrap();
        (mesh.trace_hash(), mesh.history().events())
    };
    let (a, b) = (run(5), run(5));
    assert_eq!(a, b);
    assert_ne!(a.0, run(6).0);
}

#[test]
fn a_failing_client_fails_the_run_by_name() {
    let mut mesh = line(7);
    mesh.client("broken", |ctx| async move {
        ctx.connect("gw").await?;
        Err("it gave up".into())
    });
    let err = mesh.run_clients(Duration::from_secs(30)).unwrap_err();
    assert!(err.to_string().contains("client broken: it gave up"), "{err}");
}

#[test]
#[should_panic(expected = r#"no node named "ap""#)]
fn a_fault_on_an_unknown_node_is_a_clear_panic() {
    line(8).at(Duration::ZERO).crash("ap");
}

#[test]
fn queries_name_an_unknown_node() {
    let mut mesh = line(9);
    assert!(mesh.holdings("ap", TOPIC).unwrap_err().to_string().contains(r#"no node named "ap""#));
    assert!(mesh.lag("gw", "ap").unwrap_err().to_string().contains("ap is not a peer of gw"));
    assert_eq!(mesh.holdings("eu", "acme/sensors/none").unwrap(), Vec::new());
}
