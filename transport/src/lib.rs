//! rill-transport: QUIC endpoints (quinn + rustls) with mutual TLS, the certificates they
//! use, length-prefixed postcard frames, and reconnect backoff.
//!
//! Architecture invariant: this crate moves frames between authenticated endpoints and
//! knows nothing of topics, messages or replication. Sockets, the quinn runtime and the
//! TLS clock come from a [`net::Net`] value so that the simulation can swap them.

pub mod backoff;
pub mod certs;
pub mod frame;
pub mod net;
pub mod tls;

pub use frame::{FrameError, read_frame, write_frame};
pub use net::{Net, TokioNet};
