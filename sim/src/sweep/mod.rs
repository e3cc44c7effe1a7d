//! Seeded runs: each seed draws a plan (a topology, a fault schedule and a workload),
//! runs it on a [`Mesh`] of production nodes (faults on the mesh's timeline, clients on
//! its hosts), heals, reads every node through the mesh's queries, and checks design
//! section 5's invariants. The pieces, one per file:
//! - `plan.rs`: what a seed runs, drawn from the seed alone;
//! - `workload.rs`: the producers, the operator, the function's admin and the subscriber;
//! - `check.rs`: the invariants.
mod check;
mod plan;
#[cfg(test)]
mod tests;
mod workload;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

pub use self::{
    check::Violation,
    plan::{ClustersEdit, Plan, ProducerPlan, Scheduled},
};
use self::{
    check::{Collected, Contents, Outputs, check, final_clusters},
    workload::{Held, OUTPUT, ProducerRun, Record, lock, session},
};
use crate::{Mesh, StoredMessage, env::Bugs};

const NAMESPACE: &str = "acme/sensors";
const TOPIC: &str = "acme/sensors/temp";
/// After the heal, nodes get this long (simulated) to converge before the check reads them.
const CONVERGE_WAIT: Duration = Duration::from_secs(120);
/// A run that is not done by then fails.
const SIMULATION_MAX: Duration = Duration::from_secs(1200);
/// How often the checker reads the nodes again while they converge.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// A seed's result.
#[derive(Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Its plan.
    pub plan: Plan,
    /// Hash of the datagram trace.
    pub trace_hash: u64,
    /// Simulated time.
    pub simulated: Duration,
    /// Producer switches to their second node.
    pub failovers: u64,
    /// Broken invariants (empty: all held).
    pub violations: Vec<Violation>,
}

/// Runs one seed.
pub fn run_seed(seed: u64) -> anyhow::Result<Report> {
    run_seed_with(seed, Bugs::default())
}

/// Runs one seed with injected bugs.
pub fn run_seed_with(seed: u64, bugs: Bugs) -> anyhow::Result<Report> {
    run_plan(seed, Plan::from_seed(seed), bugs)
}

/// Runs a given plan, with `seed` for everything random the plan does not fix.
pub fn run_plan(seed: u64, plan: Plan, bugs: Bugs) -> anyhow::Result<Report> {
    run_plan_with(seed, plan, bugs, true)
}

/// [`run_plan`], with or without the stream function (and invariant 6): tests of the
/// other invariants leave it out, which keeps them as fast as before it.
pub fn run_plan_with(seed: u64, plan: Plan, bugs: Bugs, function: bool) -> anyhow::Result<Report> {
    panics::reset();
    let mut mesh = build(seed, &plan, bugs)?;
    for s in &plan.faults {
        mesh.at(s.at).fault(s.fault.clone());
    }
    mesh.at(plan.heal_at).heal_all();
    let record = Arc::new(Record { function_wanted: function, ..Record::default() });
    let workers = spawn_clients(&mut mesh, &plan, &record);
    let left = |mesh: &Mesh| SIMULATION_MAX.saturating_sub(mesh.now());
    let working = |m: &Mesh| m.now() < plan.heal_at || workers.iter().any(|w| m.is_running(w));
    mesh.run_while(left(&mesh), working)?;
    let collected = collect(&mut mesh, &plan, &record)?;
    let on_subscriber = collected.holdings.get(&plan.consumer).cloned().unwrap_or_default();
    *lock(&record.collected) = Some((mesh.now(), on_subscriber));
    mesh.run_clients(left(&mesh))?;
    let mut violations = check(&plan, &collected, &record);
    violations.extend(panics::take().into_iter().map(|p| Violation { invariant: 5, detail: format!("panic: {p}") }));
    let failovers = *lock(&record.failovers);
    Ok(Report { seed, plan, trace_hash: mesh.trace_hash(), simulated: mesh.now(), failovers, violations })
}

/// The plan's mesh: its nodes, links (a dials b) and clock skews; no namespace yet (the
/// first producer creates it while the faults run).
fn build(seed: u64, plan: &Plan, bugs: Bugs) -> anyhow::Result<Mesh> {
    let mut builder = Mesh::builder(seed).bugs(bugs);
    for n in &plan.nodes {
        builder = if n.starts_with("edge") { builder.edge(n) } else { builder.region(n) };
    }
    for (a, b) in &plan.links {
        builder = builder.link(a, b);
    }
    for (n, skew) in &plan.skew_ms {
        builder = builder.clock_skew(n, *skew);
    }
    builder.build()
}

/// Starts the producers, the operator and the subscriber; answers the names of those the
/// run waits for (all but the subscriber, which waits for the check).
fn spawn_clients(mesh: &mut Mesh, plan: &Plan, record: &Arc<Record>) -> Vec<String> {
    let give_up = plan.heal_at + CONVERGE_WAIT;
    let all: BTreeSet<String> = plan.nodes.iter().cloned().collect();
    let mut workers = Vec::new();
    for (i, producer) in plan.producers.iter().enumerate() {
        let creates_namespace = (i == 0).then(|| all.clone());
        let run = ProducerRun { plan: producer.clone(), creates_namespace, give_up };
        let (name, record) = (format!("producer-{i}"), Arc::clone(record));
        mesh.client(&name, |ctx| async move {
            workload::produce(&ctx, &run, &record).await;
            Ok(())
        });
        workers.push(name);
    }
    let edits = plan.edits.clone();
    mesh.client("operator", |ctx| async move {
        workload::operate(&ctx, &edits, give_up).await;
        Ok(())
    });
    workers.push("operator".to_string());
    if record.function_wanted {
        let (via, admin_record) = (plan.producers[0].home.clone(), Arc::clone(record));
        mesh.client("fn-admin", |ctx| async move {
            workload::create_function(&ctx, &via, give_up, &admin_record).await;
            Ok(())
        });
        workers.push("fn-admin".to_string());
    }
    let (node, record) = (plan.consumer.clone(), Arc::clone(record));
    mesh.client("consumer", |ctx| async move {
        workload::consume(&ctx, &node, &record).await;
        Ok(())
    });
    workers
}

/// After the heal: waits for every node to hold the same catalogue (or CONVERGE_WAIT),
/// then reads each node until it holds every acknowledged id with its payload (a count
/// is not enough: restarting producers store messages nobody was told of). Every node is
/// read at least once, even after the deadline, so that one node that never converges
/// does not hide the others.
fn collect(mesh: &mut Mesh, plan: &Plan, record: &Record) -> anyhow::Result<Collected> {
    let deadline = mesh.now() + CONVERGE_WAIT;
    // Invariant 4 is convergence after heal: read every node's catalogue until all agree
    // or the deadline passes.
    let catalogues = loop {
        let mut catalogues = BTreeMap::new();
        for node in &plan.nodes {
            catalogues.insert(node.clone(), mesh.catalogue(node)?);
        }
        let agreed = catalogues.values().all(|c| Some(c) == catalogues.values().next());
        if agreed || mesh.now() >= deadline {
            break catalogues;
        }
        mesh.run_for(POLL_EVERY)?;
    };
    let clusters = final_clusters(&catalogues);
    let acked = lock(&record.acked).clone();
    let function = *lock(&record.function_created);
    let mut collected = Collected { catalogues, ..Collected::default() };
    for node in &plan.nodes {
        loop {
            // A node that cannot serve the topic holds nothing, as far as the check goes.
            let (held, contents) = summarize(&mesh.holdings(node, TOPIC).unwrap_or_default());
            let outputs =
                if function { outputs(&mesh.holdings(node, OUTPUT).unwrap_or_default()) } else { Outputs::new() };
            let complete = acked.iter().all(|(id, payload)| {
                contents.get(id) == Some(payload) && (!function || outputs.get(id).is_some_and(|o| !o.is_empty()))
            });
            if complete || !clusters.contains(node) || mesh.now() >= deadline {
                collected.holdings.insert(node.clone(), held);
                collected.contents.insert(node.clone(), contents);
                if function {
                    collected.outputs.insert(node.clone(), outputs);
                }
                break;
            }
            mesh.run_for(POLL_EVERY)?;
        }
    }
    Ok(collected)
}

/// The sweep function's outputs on a node, by the input they derive from (producer
/// session, seq): each output's rank and payload. Outputs of anything else are listed
/// under the session "?" with their producer name as payload.
fn outputs(messages: &[StoredMessage]) -> Outputs {
    let mut out = Outputs::new();
    for m in messages {
        let id = &m.message.id;
        let (input, entry) = match workload::output_of(id.producer.as_str()) {
            Some((input, rank)) => {
                (session(input, id.epoch), (rank, String::from_utf8_lossy(&m.message.payload).into_owned()))
            }
            None => ("?".to_string(), (u32::MAX, id.producer.to_string())),
        };
        out.entry((input, id.seq)).or_default().push(entry);
    }
    out
}

/// What a node holds, as the checker identifies it, and the payload under each id.
fn summarize(messages: &[StoredMessage]) -> (Vec<Held>, Contents) {
    let (mut held, mut contents) = (Vec::new(), BTreeMap::new());
    for m in messages {
        let id = &m.message.id;
        let name = session(id.producer.as_str(), id.epoch);
        held.push((m.message.origin.to_string(), name.clone(), id.seq));
        contents.insert((name, id.seq), String::from_utf8_lossy(&m.message.payload).into_owned());
    }
    (held, contents)
}

/// Invariant 5: panics anywhere in a run (a node task's panic is caught by its runtime
/// and would go unseen). A run is single-threaded, so the count is per thread.
mod panics {
    use std::{cell::RefCell, sync::Once};

    thread_local! {
        static SEEN: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    /// Starts counting on this thread, from zero.
    pub(super) fn reset() {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                SEEN.with(|s| s.borrow_mut().push(info.to_string()));
                previous(info);
            }));
        });
        SEEN.with(|s| s.borrow_mut().clear());
    }

    /// The panics since [`reset`].
    pub(super) fn take() -> Vec<String> {
        SEEN.with(|s| std::mem::take(&mut *s.borrow_mut()))
    }
}
