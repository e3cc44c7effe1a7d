//! rill-replication: namespace replication between nodes and namespace config convergence.
//!
//! - [`hlc`]: hybrid logical clocks for stamping config edits.
//! - [`namespace`]: the namespace catalogue and policies as one CRDT document.
//!
//! The replication core (a sans-IO state machine in the shape of quinn-proto) and its
//! async driver come next.
//!
//! Architecture invariant: nothing here touches tokio, quinn, sled, turmoil, a clock or a
//! random source; time comes in as arguments.

pub mod hlc;
pub mod namespace;
