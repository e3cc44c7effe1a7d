//! `rill certs init`.
use std::path::Path;

/// Writes a CA, a certificate per node and a client certificate into `dir`.
pub(crate) fn init(dir: &Path, nodes: &[String]) -> anyhow::Result<()> {
    for n in nodes {
        rill_storage::NodeName::parse(n)?;
    }
    rill_transport::certs::create_mesh(dir, nodes)?;
    println!(
        "wrote CA, {} node certificate(s) and the superuser client certificate 'admin' (client.pem) to {}",
        nodes.len(),
        dir.display()
    );
    Ok(())
}
