//! rill-replication: namespace replication between nodes and namespace config convergence.
//!
//! Not built yet (the mesh is its own issue). Its core will be a sans-IO state machine in
//! the shape of quinn-proto: inputs "peer said X", "local log grew", "timer fired" with the
//! time passed in, outputs "send this", "append that"; a thin async driver binds it to
//! `rill-transport` and `rill-storage`.
//!
//! Architecture invariant: the core never touches tokio, quinn, sled, turmoil, a clock or a
//! random source.
