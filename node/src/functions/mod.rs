//! Stream functions (issue 17): WebAssembly modules that transform messages on the node.
//!
//! - [`abi`]: the guest ABI, the bytes that cross between node and module (sans-IO);
//! - [`runtime`]: running a module under fuel, memory and answer limits with `wasmi`;
//! - [`ids`]: the ids of outputs, derived from their inputs;
//! - [`progress`]: the records of which inputs a node processed;
//! - [`core`]: one function over one input topic on one node (sans-IO);
//! - [`driver`]: the supervisor and tasks that run the cores against the log.
pub(crate) mod abi;
pub(crate) mod core;
pub(crate) mod driver;
pub(crate) mod ids;
pub(crate) mod progress;
pub(crate) mod runtime;
