//! rill-sim: deterministic simulation of rill meshes under turmoil.
//!
//! The nodes are the production code (`rill_node::Node`); only their I/O edges are
//! swapped through `rill_node::env::Env`: quinn runs over turmoil's simulated UDP
//! ([`net`]), the segment log over turmoil's simulated disk, which drops unsynced writes on
//! a crash ([`fs`]), metadata in a `MemMeta` that loses unflushed writes, and clock and
//! randomness come from the simulation and the seed ([`env`]).
//!
//! Two ways in:
//! - [`Mesh`]: test your own pipeline against outages. Build a mesh, run your client code
//!   on simulated hosts with the real `rill_node::client` API, script faults on a
//!   timeline, then assert on what the nodes hold and on the [`History`] of what your
//!   clients sent, got acknowledged and received.
//! - [`sweep`]: rill's own invariant checker. It draws a topology, a fault schedule and a
//!   workload from each seed, runs it and checks the invariants; `rill-sim --seeds A..B`
//!   sweeps seeds.
//!
//! # Example
//!
//! An edge gateway loses its uplink for an hour while a sensor writes through it; once
//! the link is back, the region holds every acknowledged reading exactly once.
//!
//! ```
//! use std::time::Duration;
//! use rill_sim::{Mesh, Outgoing};
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut mesh = Mesh::builder(7)
//!     .edge("gw-17")
//!     .region("eu")
//!     .link("gw-17", "eu")
//!     .namespace("acme/sensors", ["gw-17", "eu"])
//!     .tick(Duration::from_millis(100)) // hours of simulated time: a coarse step
//!     .build()?;
//! mesh.client("sensor", |ctx| async move {
//!     let mut producer = ctx.producer("gw-17", "acme/sensors/temp", "sensor-1").await?;
//!     for i in 0..120 {
//!         producer.send(vec![Outgoing::payload(format!("{i}"))]).await?;
//!         producer.flush().await?;
//!         ctx.sleep(Duration::from_secs(60)).await;
//!     }
//!     Ok(())
//! });
//! let t = mesh.now();
//! mesh.at(t + Duration::from_secs(600)).isolate("gw-17");
//! mesh.at(t + Duration::from_secs(4200)).rejoin("gw-17");
//! mesh.run_clients(Duration::from_secs(3 * 3600))?;
//! mesh.wait_converged("acme/sensors", Duration::from_secs(60))?;
//!
//! let held = mesh.holdings("eu", "acme/sensors/temp")?;
//! let acked = mesh.history().acked("acme/sensors/temp");
//! assert_eq!(acked.len(), 120);
//! assert_eq!(held.len(), 120);
//! assert!(held.iter().all(|m| acked.contains(&m.message.id)));
//! # Ok(())
//! # }
//! ```
//!
//! Architecture invariant: nothing depends on this crate.

pub mod client;
mod clock;
pub mod env;
pub mod fs;
pub mod history;
pub mod mesh;
pub mod net;
mod rng;
pub mod sweep;

pub use client::{Ctx, SimConsumer, SimProducer};
pub use history::{Delivery, Event, History};
pub use mesh::{At, Fault, Lag, Latency, Mesh, MeshBuilder};
pub use rill_node::{
    client::{BatchAck, Client, ClientError, Consumer, Outgoing, Producer},
    protocol::{ConsumerOptions, NodeStats, Produced, SeekTarget, StartPosition, SubscriptionType},
};
pub use rill_storage::message::{Message, MessageId, StoredMessage};
