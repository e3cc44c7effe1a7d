//! rill-node: the rill node (config, client-facing server, durable topics), the client
//! library used by the CLI, tests and applications, and the `rill` command line.
//!
//! Architecture invariant: the node takes every I/O edge (clock, randomness, files,
//! metadata store, sockets, TLS clock) from one [`env::Env`]; no code here reads the system
//! clock or a thread RNG except the production `Env` itself.

mod authz;
pub mod cli;
pub mod client;
pub mod config;
mod conflicts;
mod consume;
mod dispatch;
pub mod env;
mod error;
mod functions;
mod mesh;
mod node;
pub mod protocol;
mod registry;
mod retention;
mod server;
mod stats;
mod topic;

pub use node::{Node, StartError};
