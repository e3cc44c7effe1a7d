//! rill-sim: deterministic simulation of rill meshes under turmoil.
//!
//! The nodes are the production code (`rill_node::Node`); only their I/O edges are
//! swapped through `rill_node::env::Env`: quinn runs over turmoil's simulated UDP
//! ([`net`]), the segment log over turmoil's simulated disk, which drops unsynced writes on
//! a crash ([`fs`]), metadata in a `MemMeta` that loses unflushed writes, and clock and
//! randomness come from the simulation and the seed ([`env`]).
//!
//! [`sweep`] draws a topology, a fault schedule and a workload from each seed, runs it and
//! checks the invariants; `rill-sim --seeds A..B` sweeps seeds.
//!
//! Architecture invariant: nothing depends on this crate.

pub mod env;
pub mod fs;
pub mod net;
pub mod sweep;
