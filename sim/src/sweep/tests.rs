//! The sweep's own tests: plans, seeds, and that the checker catches injected bugs.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use rill_node::env::Bugs as NodeBugs;

use super::{plan::FAULTS_END, *};
use crate::mesh::Fault;

#[test]
fn plans_cover_the_topologies_faults_and_workloads() {
    let plans: Vec<Plan> = (0..200).map(Plan::from_seed).collect();
    let sizes: BTreeSet<(usize, usize)> = plans
        .iter()
        .map(|p| {
            let edges = p.nodes.iter().filter(|n| n.starts_with("edge")).count();
            (edges, p.nodes.len() - edges)
        })
        .collect();
    assert_eq!(sizes, (1..=4).flat_map(|e| [(e, 2), (e, 3)]).collect());
    let kinds: BTreeSet<&str> = plans.iter().flat_map(|p| p.fault_kinds().into_keys()).collect();
    let want = [
        "clock skew",
        "clusters change",
        "crash",
        "disk errors",
        "latency+loss",
        "link flap",
        "link partition",
        "long edge outage",
        "site partition",
    ];
    assert_eq!(kinds, want.into());
    assert!(plans.iter().any(|p| p.producers.iter().filter(|q| q.failover.is_some()).count() >= 2));
    assert!(plans.iter().any(|p| p.edits.len() == 1) && plans.iter().any(|p| p.edits.len() == 2));
    for p in &plans {
        assert!(p.faults.windows(2).all(|w| w[0].at <= w[1].at), "faults out of time order");
        assert!(p.faults.iter().all(|f| f.at <= p.heal_at));
        // Every region-removing edit leaves every edge an uplink, and region-a in.
        for e in &p.edits {
            assert!(e.clusters.contains("region-a"));
            for edge in p.nodes.iter().filter(|n| n.starts_with("edge")) {
                assert!(p.links.iter().any(|(a, b)| a == edge && e.clusters.contains(b)), "{edge} cut off: {p:?}");
            }
        }
    }
}

/// CI sweeps 200 seeds, in four tests so they run in parallel.
fn sweep(seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let report = run_seed(seed).unwrap();
        assert!(report.violations.is_empty(), "seed {seed}: {:?}\nplan {:?}", report.violations, report.plan);
    }
}

#[test]
fn seeds_0_to_50_hold_every_invariant() {
    sweep(0..50);
}

#[test]
fn seeds_50_to_100_hold_every_invariant() {
    sweep(50..100);
}

#[test]
fn seeds_100_to_150_hold_every_invariant() {
    sweep(100..150);
}

#[test]
fn seeds_150_to_200_hold_every_invariant() {
    sweep(150..200);
}

#[test]
fn seeds_200_to_250_hold_every_invariant() {
    sweep(200..250);
}

/// Includes seed 252: a link replaced while its batches were in flight on a dead
/// connection stalled a lane (invariant 1) until the core took over link identity.
#[test]
fn seeds_250_to_300_hold_every_invariant() {
    sweep(250..300);
}

/// A schedule the random plans rarely draw, a hand-made plan through `run_plan`: an
/// edge whose disk fails for seconds at a time, again and again, while producers on
/// it and on both regions write. (Written after soak seeds 667, 898 and 946 found
/// replaced links' appenders storing and acknowledging out of turn; it does not
/// reproduce that bug, whose seeds are recorded in the README.)
#[test]
fn a_flapping_disk_on_a_receiver_keeps_every_producer_in_order() {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut faults = Vec::new();
    for i in 0..8u64 {
        let at = Duration::from_millis(1000 + i * 2300);
        faults.push(Scheduled::injects(at, "disk errors", Fault::FailDiskWrites("edge-1".into())));
        let heal = at + Duration::from_millis(1500 + (i % 3) * 300);
        faults.push(Scheduled::follows(heal, Fault::HealDisk("edge-1".into())));
    }
    let producer = ProducerPlan::plain;
    for seed in 0..3 {
        let plan = Plan {
            nodes: names(&["edge-1", "region-a", "region-b"]),
            links: vec![("region-a".into(), "region-b".into()), ("edge-1".into(), "region-a".into())],
            skew_ms: BTreeMap::new(),
            faults: faults.clone(),
            heal_at: FAULTS_END,
            producers: vec![producer("sensor-1", "edge-1"), producer("model", "region-b"), producer("ml", "region-a")],
            edits: Vec::new(),
            consumer: "region-b".into(),
        };
        let report = run_plan(seed, plan, Bugs::default()).unwrap();
        assert!(report.violations.is_empty(), "seed {seed}: {:?}", report.violations);
    }
}

/// The first seed below `limit` whose run shows a violation of `invariant` (with the
/// stream function only for invariant 6, its own).
fn caught(bugs: Bugs, limit: u64, invariant: u8) -> Option<u64> {
    (0..limit).find(|&seed| {
        let report = run_plan_with(seed, Plan::from_seed(seed), bugs, invariant == 6).unwrap();
        report.violations.iter().any(|v| v.invariant == invariant)
    })
}

#[test]
fn the_sweep_catches_acknowledging_before_sync() {
    let bugs = Bugs { skip_sync: true, ..Bugs::default() };
    assert!(caught(bugs, 40, 1).is_some(), "40 seeds with syncs skipped and no lost message: the checker is blind");
}

#[test]
fn the_sweep_catches_disabled_dedup() {
    let bugs = Bugs { node: NodeBugs { no_dedup: true, ..NodeBugs::default() }, ..Bugs::default() };
    assert!(caught(bugs, 20, 2).is_some(), "20 seeds without dedup and no duplicate: the checker is blind");
}

/// A producer restarted without memory fails over from an edge that crashed after its
/// uplink was cut to a region that lacks its latest acknowledged batches. With an epoch per session
/// every content keeps its own id; with wave 1's one id space per producer (the
/// `shared_epoch` bug) the region hands the producer's old seqs out again for other
/// payloads, and the checker finds ids with two contents.
#[test]
fn a_producer_restarted_through_another_node_never_gives_an_id_two_contents() {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (edge, region) = ("edge-1".to_string(), "region-a".to_string());
    let plan = |chosen_seqs| Plan {
        nodes: names(&["edge-1", "region-a"]),
        links: vec![(edge.clone(), region.clone())],
        skew_ms: BTreeMap::new(),
        faults: vec![
            Scheduled::injects(
                Duration::from_millis(500),
                "link partition",
                Fault::Partition(edge.clone(), region.clone()),
            ),
            // Down until the heal, which restarts it.
            Scheduled::injects(Duration::from_secs(5), "crash", Fault::Crash(edge.clone())),
        ],
        heal_at: FAULTS_END,
        producers: vec![ProducerPlan {
            name: "gw".into(),
            home: edge.clone(),
            failover: Some(region.clone()),
            chosen_seqs,
            restarts: true,
        }],
        edits: Vec::new(),
        consumer: region.clone(),
    };
    let shared_epoch = Bugs { node: NodeBugs { shared_epoch: true, ..NodeBugs::default() }, ..Bugs::default() };
    for chosen_seqs in [false, true] {
        let report = run_plan_with(1, plan(chosen_seqs), Bugs::default(), false).unwrap();
        assert!(report.violations.is_empty(), "chosen seqs {chosen_seqs}: {:?}", report.violations);
        assert!(report.failovers > 0, "the producer never failed over: the test proves nothing: {report:?}");
    }
    let report = run_plan_with(1, plan(false), shared_epoch, false).unwrap();
    let twins = report.violations.iter().any(|v| v.detail.contains("two contents"));
    assert!(twins, "ids reused through another node and no id with two contents: {:?}", report.violations);
}

#[test]
fn the_sweep_catches_a_replicator_that_skips_a_batch() {
    let bugs = Bugs { node: NodeBugs { skip_batch: true, ..NodeBugs::default() }, ..Bugs::default() };
    assert!(caught(bugs, 20, 1).is_some(), "20 seeds skipping batches and no lost message: the checker is blind");
}

#[test]
fn the_sweep_catches_a_function_that_drops_outputs() {
    let bugs = Bugs { node: NodeBugs { fn_drop_output: true, ..NodeBugs::default() }, ..Bugs::default() };
    assert!(caught(bugs, 5, 6).is_some(), "5 seeds dropping function outputs and none missing: the checker is blind");
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    // A seed whose faults draw on every source of randomness: loss, torn writes, skew.
    let busy = |seed: &u64| {
        let kinds = Plan::from_seed(*seed).fault_kinds();
        ["latency+loss", "crash", "disk errors", "clock skew"].iter().all(|k| kinds.contains_key(k))
    };
    let seed = (0..1000).find(busy).expect("a seed with every kind of randomness");
    // Without the stream function: with it, a seed's trace has been seen to take one of
    // two forms from run to run (README, Simulation: known, cause not yet found).
    let run = |seed: u64| run_plan_with(seed, Plan::from_seed(seed), Bugs::default(), false).unwrap();
    let (a, b) = (run(seed), run(seed));
    assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}");
    assert_ne!(a.trace_hash, run(seed + 1).trace_hash);
}

/// A stable fingerprint of a plan (FNV-1a over its `Debug` form).
fn fingerprint(plan: &Plan) -> u64 {
    format!("{plan:?}").bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// What a seed means is its plan: a refactor of the drawing code that changes the plan of
/// any of these seeds fails here, so soak results and reported seeds stay comparable. If
/// a change of plans is meant, pin the new values (and say so in the commit).
#[test]
fn plans_of_pinned_seeds_do_not_change() {
    let pinned: [(u64, u64); 5] = [
        (0, 0x7dfe_7b2c_9465_7ee4),
        (1, 0x7f76_9be0_3929_34e5),
        (42, 0xaeef_1619_2d86_d0fc),
        (252, 0x620b_e404_85c0_28d8),
        (667, 0x949b_ce1e_9982_db17),
    ];
    let now: Vec<(u64, u64)> = pinned.iter().map(|(s, _)| (*s, fingerprint(&Plan::from_seed(*s)))).collect();
    for ((seed, want), (_, got)) in pinned.iter().zip(&now) {
        assert_eq!(got, want, "seed {seed} draws another plan: {:#?}\nall now: {now:#x?}", Plan::from_seed(*seed));
    }
}
