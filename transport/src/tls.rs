//! rustls configurations for rill's QUIC endpoints: TLS 1.3 only, mutual authentication
//! against the mesh CA, the TLS clock injected (the simulation runs on simulated time).
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::{RootCertStore, crypto::CryptoProvider, server::WebPkiClientVerifier, time_provider::TimeProvider};

use crate::certs::LoadedIdentity;

/// ALPN of client connections (produce, consume, admin).
pub const ALPN_CLIENT: &[u8] = b"rill-client/4";
/// ALPN of peer links between nodes.
pub const ALPN_PEER: &[u8] = b"rill-peer/5";

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls rejected the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn rejected the configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(id: &LoadedIdentity) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in &id.ca {
        roots.add(ca.clone())?;
    }
    Ok(Arc::new(roots))
}

/// Server side: requires a client certificate from the mesh CA; offers `alpns`.
pub fn server_config(
    id: &LoadedIdentity,
    time: Arc<dyn TimeProvider>,
    alpns: &[&[u8]],
) -> Result<QuicServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(id)?, provider()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_details(provider(), time)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))
}

/// Client side: trusts only the mesh CA and presents this identity's certificate.
pub fn client_config(
    id: &LoadedIdentity,
    time: Arc<dyn TimeProvider>,
    alpn: &[u8],
) -> Result<QuicClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_details(provider(), time)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(id)?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))
}
