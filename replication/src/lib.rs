//! rill-replication: namespace replication between nodes and namespace config convergence.
//!
//! - [`hlc`]: hybrid logical clocks for stamping config edits.
//! - [`namespace`]: the namespace catalogue and policies as one CRDT document.
//! - [`core`]: the replication state machine (sans-IO, in the shape of quinn-proto).
//!
//! The async driver that binds the core to QUIC peer links and the log comes next.
//!
//! Architecture invariant: nothing here touches tokio, quinn, sled, turmoil, a clock or a
//! random source; time comes in as arguments.

pub mod core;
pub mod hlc;
pub mod namespace;
