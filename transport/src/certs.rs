//! Certificates for a mesh: one CA, a certificate per node (usable as server and as
//! client, for peer links) and client certificates, each naming a principal, all Ed25519
//! (fixed-length signatures keep simulated traces deterministic).
//!
//! Files in a certificate directory: `ca.pem`, `ca.key`, `<node>.pem`, `<node>.key`, and
//! `<identity>.pem`, `<identity>.key` per client identity; `client.pem` is the superuser
//! `admin` that `rill certs init` and a node's first start make.
//!
//! What a certificate says about its holder ([`holder`]):
//! - a node certificate carries the DNS names `<node>` and [`MESH_SERVER_NAME`];
//! - a client certificate carries the URI `rill:principal:<name>`, and a superuser's also
//!   `rill:superuser`. The CA signed both, so neither can be added by the holder.
use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};

/// The DNS name every node certificate carries besides its own name: clients, which know
/// a node's address but not its name, verify the server against this name and the CA.
pub const MESH_SERVER_NAME: &str = "node.rill";

/// The URI prefix naming a client certificate's principal.
const PRINCIPAL_URI: &str = "rill:principal:";
/// The URI marking a superuser's certificate.
const SUPERUSER_URI: &str = "rill:superuser";
/// The principal of the client certificate `rill certs init` and a node's first start make.
pub const DEFAULT_PRINCIPAL: &str = "admin";
/// The file stem of the default client identity.
pub const DEFAULT_IDENTITY: &str = "client";

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
    /// Refusing to overwrite an existing certificate.
    #[error("{0} already exists; remove it or choose another name")]
    Exists(PathBuf),
    /// A principal name is invalid.
    #[error("principal '{name}': {reason}")]
    Principal {
        /// The name given.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
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

    /// The default client identity (`client.pem`: the superuser `admin`) in `dir`.
    pub fn client(dir: &Path) -> Self {
        Self::node(dir, DEFAULT_IDENTITY)
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

/// Checks a principal name: 1..=64 characters of `[A-Za-z0-9._-]`, like a part of a topic
/// name (a principal scopes producer names as `principal/name`, so no `/`).
pub fn check_principal(name: &str) -> Result<(), CertError> {
    let bad = |reason| Err(CertError::Principal { name: name.to_string(), reason });
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1..=64 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return bad("may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Issues a client certificate for `principal` from the CA in `dir`, written as
/// `<file_stem>.pem` and `<file_stem>.key`; refuses to overwrite either.
pub fn issue_principal(dir: &Path, file_stem: &str, principal: &str, superuser: bool) -> Result<Identity, CertError> {
    check_principal(principal)?;
    let id = Identity::node(dir, file_stem);
    for path in [&id.cert, &id.key] {
        if path.exists() {
            return Err(CertError::Exists(path.clone()));
        }
    }
    let mut params = leaf_params(principal, Vec::new(), false)?;
    let uri = |s: String| rcgen::string::Ia5String::try_from(s).map(SanType::URI);
    params.subject_alt_names.push(uri(format!("{PRINCIPAL_URI}{principal}"))?);
    if superuser {
        params.subject_alt_names.push(uri(SUPERUSER_URI.to_string())?);
    }
    issue(dir, &id, params)
}

/// Issues the default client identity (`client.pem`): the superuser `admin`.
pub fn issue_client(dir: &Path) -> Result<Identity, CertError> {
    issue_principal(dir, DEFAULT_IDENTITY, DEFAULT_PRINCIPAL, true)
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
    let names_principal = client.load().is_ok_and(|c| holder(&c.chain[0]).is_ok());
    if !names_principal {
        // Missing, or made before principals existed: make the superuser anew.
        for path in [&client.cert, &client.key] {
            let _ = std::fs::remove_file(path);
        }
        issue_client(dir)?;
        tracing::info!(dir = %dir.display(), principal = DEFAULT_PRINCIPAL, "issued dev superuser client certificate");
    }
    Ok(node)
}

/// Who holds a certificate the mesh CA signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A node: it may replicate and nothing else.
    Node(String),
    /// A client principal.
    Principal {
        /// Its name.
        name: String,
        /// True for a superuser's certificate: allowed everything.
        superuser: bool,
    },
}

/// What a certificate says about its holder (it does not check the signature: the TLS
/// handshake or [`verify_signed`] does that).
pub fn holder(cert: &CertificateDer<'_>) -> Result<Holder, String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| format!("unreadable certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?
        .map(|ext| &ext.value.general_names[..])
        .unwrap_or_default();
    let dns: Vec<&str> = san
        .iter()
        .filter_map(|n| if let x509_parser::extensions::GeneralName::DNSName(d) = n { Some(*d) } else { None })
        .collect();
    let uris: Vec<&str> = san
        .iter()
        .filter_map(|n| if let x509_parser::extensions::GeneralName::URI(u) = n { Some(*u) } else { None })
        .collect();
    if dns.contains(&MESH_SERVER_NAME) {
        let name = dns.iter().find(|d| **d != MESH_SERVER_NAME).unwrap_or(&"");
        return Ok(Holder::Node(name.to_string()));
    }
    let principal = uris.iter().find_map(|u| u.strip_prefix(PRINCIPAL_URI));
    match principal {
        Some(name) if check_principal(name).is_ok() => {
            Ok(Holder::Principal { name: name.to_string(), superuser: uris.contains(&SUPERUSER_URI) })
        }
        Some(name) => Err(format!("the certificate names an invalid principal '{name}'")),
        None => Err("the certificate names no principal (made before principals existed? make one with \
                     `rill certs issue`)"
            .into()),
    }
}

/// Signs `message` with an identity's private key (Ed25519, as every key of a mesh).
pub fn sign(key: &PrivateKeyDer<'_>, message: &[u8]) -> Result<Vec<u8>, String> {
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(key.secret_der())
        .map_err(|e| format!("not an Ed25519 private key: {e}"))?;
    Ok(pair.sign(message).as_ref().to_vec())
}

/// Checks that `cert` is a client certificate the CA `ca` signed, valid at `at_ms`
/// (milliseconds since the Unix epoch), and that `signature` is its key's signature of
/// `message`. Returns the principal it names; a node certificate is refused.
pub fn verify_signed(
    ca: &[CertificateDer<'_>],
    cert: &CertificateDer<'_>,
    at_ms: u64,
    message: &[u8],
    signature: &[u8],
) -> Result<Holder, String> {
    let anchors: Vec<_> = ca
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CA certificate: {e}"))?;
    let end_entity = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("signer certificate: {e}"))?;
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms.all;
    let time = UnixTime::since_unix_epoch(Duration::from_millis(at_ms));
    end_entity
        .verify_for_usage(algorithms, &anchors, &[], time, webpki::KeyUsage::client_auth(), None, None)
        .map_err(|e| format!("signer certificate is not from the mesh CA: {e}"))?;
    let ed25519 = algorithms
        .iter()
        .find(|a| a.public_key_alg_id() == rustls_pki_types::alg_id::ED25519)
        .ok_or("no Ed25519 verifier")?;
    end_entity.verify_signature(*ed25519, message, signature).map_err(|e| format!("bad signature: {e}"))?;
    match holder(cert)? {
        Holder::Node(name) => Err(format!("signed by node '{name}': a node certificate may only replicate")),
        principal => Ok(principal),
    }
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
    fn certificates_name_their_holder() {
        let dir = tempfile::tempdir().unwrap();
        create_mesh(dir.path(), &["edge-1"]).unwrap();
        let alice = issue_principal(dir.path(), "alice", "alice", false).unwrap().load().unwrap();
        let admin = Identity::client(dir.path()).load().unwrap();
        let node = Identity::node(dir.path(), "edge-1").load().unwrap();
        assert_eq!(holder(&alice.chain[0]), Ok(Holder::Principal { name: "alice".into(), superuser: false }));
        assert_eq!(holder(&admin.chain[0]), Ok(Holder::Principal { name: "admin".into(), superuser: true }));
        assert_eq!(holder(&node.chain[0]), Ok(Holder::Node("edge-1".into())));
        assert!(matches!(issue_principal(dir.path(), "alice", "alice", false), Err(CertError::Exists(_))));
        assert!(matches!(issue_principal(dir.path(), "b", "a/b", false), Err(CertError::Principal { .. })));
        // A wave-1 client certificate names no principal; the dev setup replaces it.
        std::fs::remove_file(dir.path().join("client.pem")).unwrap();
        std::fs::remove_file(dir.path().join("client.key")).unwrap();
        issue(
            dir.path(),
            &Identity::client(dir.path()),
            leaf_params("rill client", vec!["client.rill".into()], false).unwrap(),
        )
        .unwrap();
        let legacy = Identity::client(dir.path()).load().unwrap();
        assert!(holder(&legacy.chain[0]).unwrap_err().contains("names no principal"));
        ensure_dev_certs(dir.path(), "edge-1").unwrap();
        let renewed = Identity::client(dir.path()).load().unwrap();
        assert_eq!(holder(&renewed.chain[0]), Ok(Holder::Principal { name: "admin".into(), superuser: true }));
    }

    #[test]
    fn signatures_verify_against_the_mesh_ca_only() {
        let dir = tempfile::tempdir().unwrap();
        create_mesh(dir.path(), &["edge-1"]).unwrap();
        let alice = issue_principal(dir.path(), "alice", "alice", false).unwrap().load().unwrap();
        let node = Identity::node(dir.path(), "edge-1").load().unwrap();
        let now = 1_800_000_000_000;
        let sig = sign(&alice.key, b"grant").unwrap();
        let ok = verify_signed(&alice.ca, &alice.chain[0], now, b"grant", &sig);
        assert_eq!(ok, Ok(Holder::Principal { name: "alice".into(), superuser: false }));
        assert!(verify_signed(&alice.ca, &alice.chain[0], now, b"grans", &sig).unwrap_err().contains("bad signature"));
        // A node's key signs validly, but a node may only replicate.
        let by_node = sign(&node.key, b"grant").unwrap();
        let err = verify_signed(&node.ca, &node.chain[0], now, b"grant", &by_node).unwrap_err();
        assert!(err.contains("may only replicate"), "{err}");
        // Another mesh's CA vouches for nothing here.
        let other = tempfile::tempdir().unwrap();
        create_mesh(other.path(), &["x"]).unwrap();
        let mallory = Identity::client(other.path()).load().unwrap();
        let forged = sign(&mallory.key, b"grant").unwrap();
        let err = verify_signed(&alice.ca, &mallory.chain[0], now, b"grant", &forged).unwrap_err();
        assert!(err.contains("not from the mesh CA"), "{err}");
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
