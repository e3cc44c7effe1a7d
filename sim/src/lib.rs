//! rill-sim: deterministic simulation of whole rill meshes under turmoil.
//!
//! Not built yet (its own issue). The node is already shaped for it: every I/O edge comes
//! from `rill_node::env::Env` (clock, randomness, the segment log's file system, the
//! metadata store, the UDP socket and quinn runtime, the TLS clock), and
//! `rill_storage::meta::MemMeta` is the crash-losing metadata store the simulation will use.
//!
//! Architecture invariant: nothing depends on this crate.
