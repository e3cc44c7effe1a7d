//! Stream functions (issue 17): WebAssembly modules that transform messages on the node.
//!
//! - [`abi`]: the guest ABI, the bytes that cross between node and module (sans-IO);
//! - [`runtime`]: running a module under fuel, memory and answer limits with `wasmi`.
//!
//! Placement, derived output ids, the progress topic and the catalogue entries come next;
//! `rill fn test` already runs a module over sample input with no node.
pub(crate) mod abi;
pub(crate) mod core;
pub(crate) mod driver;
pub(crate) mod ids;
pub(crate) mod runtime;
