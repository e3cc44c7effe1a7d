//! rill-replication: namespace replication between nodes and namespace config convergence.
//!
//! - [`access`]: grants and tokens, signed entries of the catalogue, and what they allow.
//! - [`function`]: a stream function's definition, a catalogue entry.
//! - [`hlc`]: hybrid logical clocks for stamping config edits.
//! - [`namespace`]: the namespace catalogue and policies as one CRDT document.
//! - [`wire`]: the peer protocol's messages and the Hello's [`wire::Summary`].
//! - [`link`]: link identity: which connection to a peer counts, and the others' fate.
//! - [`core`]: the replication state machine (sans-IO, in the shape of quinn-proto).
//!
//! The async driver that binds the core to QUIC peer links and the log is
//! `rill_node::mesh`.
//!
//! Architecture invariant: nothing here touches tokio, quinn, sled, turmoil, a clock or a
//! random source; time and randomness come in as arguments.

pub mod access;
pub mod core;
pub mod function;
pub mod hlc;
pub mod link;
pub mod namespace;
pub mod wire;
