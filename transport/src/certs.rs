//! Certificates for a mesh: one CA, a certificate per node (usable as server and as
//! client, for peer links) and client certificates, all Ed25519 (fixed-length signatures
//! keep simulated traces deterministic).
//!
//! Files in a certificate directory: `ca.pem`, `ca.key`, `<node>.pem`, `<node>.key`,
//! `client.pem`, `client.key`.
use std::{
    io,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// The DNS name every node certificate carries besides its own name: clients, which know
/// a node's address but not its name, verify the server against this name and the CA.
pub const MESH_SERVER_NAME: &str = "node.rill";

/// The CA's distinguished name; fixed so that the issuer can be rebuilt from its key alone.
const CA_COMMON_NAME: &str = "rill mesh CA";

/// Errors making, writing or loading certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file does not hold what it should.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Refusing to overwrite an existing CA.
    #[error("{0} already holds a CA; remove it or use another directory")]
    CaExists(PathBuf),
}

/// Paths of one identity's certificate and key, plus the CA that vouches for peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// This identity's certificate (PEM).
    pub cert: PathBuf,
    /// This identity's private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl Identity {
    /// The node identity `name` in certificate directory `dir`.
    pub fn node(dir: &Path, name: &str) -> Self {
        Identity { ca: dir.join("ca.pem"), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
    }

    /// The client identity in certificate directory `dir`.
    pub fn client(dir: &Path) -> Self {
        Self::node(dir, "client")
    }
}

fn write(path: &Path, contents: &str) -> Result<(), CertError> {
    std::fs::write(path, contents).map_err(|source| CertError::Io { path: path.to_path_buf(), source })
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io { path: path.to_path_buf(), source })
}

fn ca_params() -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(Vec::new())?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

fn leaf_params(common_name: &str, sans: Vec<String>, server: bool) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if server {
        p.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    Ok(p)
}

/// Creates a new CA in `dir` (which is created if needed); refuses to overwrite one.
pub fn create_ca(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.to_path_buf(), source })?;
    let ca_pem = dir.join("ca.pem");
    if ca_pem.exists() {
        return Err(CertError::CaExists(dir.to_path_buf()));
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = ca_params()?;
    params.serial_number = Some(serial_number(&key));
    let cert = params.self_signed(&key)?;
    write_private(&dir.join("ca.key"), &key.serialize_pem())?;
    write(&ca_pem, &cert.pem())
}

fn write_private(path: &Path, pem: &str) -> Result<(), CertError> {
    write(path, pem)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| CertError::Io { path: path.to_path_buf(), source })?;
    }
    Ok(())
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let key_path = dir.join("ca.key");
    let key = KeyPair::from_pem(&read(&key_path)?)
        .map_err(|e| CertError::Invalid { path: key_path, reason: format!("not a CA private key: {e}") })?;
    Ok(Issuer::new(ca_params()?, key))
}

/// Issues a certificate for node `name` from the CA in `dir`.
pub fn issue_node(dir: &Path, name: &str) -> Result<Identity, CertError> {
    let sans = vec![name.to_string(), MESH_SERVER_NAME.to_string()];
    issue(dir, &Identity::node(dir, name), leaf_params(name, sans, true)?)
}

/// Issues the client certificate from the CA in `dir`.
pub fn issue_client(dir: &Path) -> Result<Identity, CertError> {
    issue(dir, &Identity::client(dir), leaf_params("rill client", vec!["client.rill".into()], false)?)
}

/// A serial number of a fixed 20 bytes from the key's SHA-256, its first byte in
/// 0x40..=0x7f: positive, as RFC 5280 wants, and never shortened by DER's minimal encoding,
/// so every certificate of a kind has one length (the simulation replays a seed to the
/// same datagrams only if the handshakes carrying them do not change size).
fn serial_number(key: &KeyPair) -> rcgen::SerialNumber {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    let mut serial = digest.as_ref()[..20].to_vec();
    serial[0] = 0x40 | (serial[0] & 0x3f);
    rcgen::SerialNumber::from_slice(&serial)
}

fn issue(dir: &Path, id: &Identity, mut params: CertificateParams) -> Result<Identity, CertError> {
    let issuer = load_issuer(dir)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    params.serial_number = Some(serial_number(&key));
    let cert = params.signed_by(&key, &issuer)?;
    write_private(&id.key, &key.serialize_pem())?;
    write(&id.cert, &cert.pem())?;
    Ok(id.clone())
}

/// Creates a mesh in `dir`: a new CA, a certificate for each node, and the client
/// certificate (refuses a directory that already holds a CA).
pub fn create_mesh<S: AsRef<str>>(dir: &Path, nodes: &[S]) -> Result<(), CertError> {
    create_ca(dir)?;
    for n in nodes {
        issue_node(dir, n.as_ref())?;
    }
    issue_client(dir)?;
    Ok(())
}

/// Makes sure `dir` holds a CA, a certificate for node `name` and a client certificate,
/// creating what is missing. Returns the node's identity. Used for dev certificates on a
/// node's first start.
pub fn ensure_dev_certs(dir: &Path, name: &str) -> Result<Identity, CertError> {
    if !dir.join("ca.pem").exists() {
        create_ca(dir)?;
        tracing::info!(dir = %dir.display(), "created dev CA");
    }
    let node = Identity::node(dir, name);
    if !node.cert.exists() || !node.key.exists() {
        issue_node(dir, name)?;
        tracing::info!(node = name, dir = %dir.display(), "issued dev node certificate");
    }
    let client = Identity::client(dir);
    if !client.cert.exists() || !client.key.exists() {
        issue_client(dir)?;
    }
    Ok(node)
}

/// Loaded certificate material.
#[derive(Debug)]
pub struct LoadedIdentity {
    /// Trusted CA certificates.
    pub ca: Vec<CertificateDer<'static>>,
    /// This identity's certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// This identity's private key.
    pub key: PrivateKeyDer<'static>,
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Invalid { path: path.to_path_buf(), reason: format!("bad PEM: {e}") })?;
    if certs.is_empty() {
        return Err(CertError::Invalid { path: path.to_path_buf(), reason: "no certificate in file".into() });
    }
    Ok(certs)
}

impl Identity {
    /// Reads the files.
    pub fn load(&self) -> Result<LoadedIdentity, CertError> {
        let key_pem = read(&self.key)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| CertError::Invalid { path: self.key.clone(), reason: format!("no private key: {e}") })?;
        Ok(LoadedIdentity { ca: load_certs(&self.ca)?, chain: load_certs(&self.cert)?, key })
    }
}

/// The first of `names` that `cert` is valid for (by its DNS names): how a node tells which
/// configured peer presented a certificate the mesh CA already vouched for.
pub fn matching_name<'n>(cert: &CertificateDer<'_>, names: impl IntoIterator<Item = &'n str>) -> Option<&'n str> {
    let end_entity = webpki::EndEntityCert::try_from(cert).ok()?;
    names.into_iter().find(|name| {
        rustls_pki_types::ServerName::try_from(*name)
            .is_ok_and(|server_name| end_entity.verify_is_valid_for_subject_name(&server_name).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_and_loads_a_mesh() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        assert!(matches!(create_ca(dir.path()), Err(CertError::CaExists(_))));
        let node = issue_node(dir.path(), "edge-1").unwrap();
        let client = issue_client(dir.path()).unwrap();
        let loaded = node.load().unwrap();
        assert_eq!(loaded.chain.len(), 1);
        client.load().unwrap();
        // ensure_dev_certs adds only what is missing.
        let before = std::fs::read(&node.cert).unwrap();
        ensure_dev_certs(dir.path(), "edge-1").unwrap();
        assert_eq!(std::fs::read(&node.cert).unwrap(), before);
        ensure_dev_certs(dir.path(), "cloud-eu").unwrap();
        assert!(dir.path().join("cloud-eu.pem").exists());
        let eu = Identity::node(dir.path(), "cloud-eu").load().unwrap();
        assert_eq!(matching_name(&eu.chain[0], ["edge-1", "cloud-eu"]), Some("cloud-eu"));
        assert_eq!(matching_name(&eu.chain[0], ["edge-1"]), None);
        assert_eq!(matching_name(&client.load().unwrap().chain[0], ["edge-1", "cloud-eu"]), None);
    }

    #[test]
    fn bad_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "not pem").unwrap();
        std::fs::write(dir.path().join("x.pem"), "not pem").unwrap();
        std::fs::write(dir.path().join("x.key"), "not pem").unwrap();
        let err = Identity::node(dir.path(), "x").load().unwrap_err().to_string();
        assert!(err.contains("x.key"), "{err}");
        let missing = Identity::node(&dir.path().join("nope"), "x").load().unwrap_err().to_string();
        assert!(missing.contains("nope"), "{missing}");
    }

    /// DER drops leading zero bytes of a serial, so rcgen's default (a hash with only the
    /// top bit cleared) came out a byte shorter about once in 128 certificates, and so did
    /// the handshakes carrying it: the simulation's replays then differed.
    #[test]
    fn certificates_of_one_kind_have_one_length() {
        let mut lengths = std::collections::BTreeSet::new();
        for _ in 0..400 {
            let dir = tempfile::tempdir().unwrap();
            create_ca(dir.path()).unwrap();
            let node = issue_node(dir.path(), "edge-1").unwrap();
            lengths.insert((
                std::fs::read(dir.path().join("ca.pem")).unwrap().len(),
                std::fs::read(&node.cert).unwrap().len(),
            ));
        }
        assert_eq!(lengths.len(), 1, "{lengths:?}");
    }
}
