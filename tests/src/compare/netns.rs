//! Two network namespaces joined by two veth pairs: the uplink, which the benchmark cuts,
//! and a management link the harness uses to watch the cloud side, which stays up.
//!
//! ```text
//!   edge namespace (harness, edge servers)        cloud namespace (cloud servers)
//!   rcup-e 10.231.0.1/30  <---- uplink ---->      rcup-c 10.231.0.2/30
//!   rcmg-e 10.231.1.1/30  <-- management -->      rcmg-c 10.231.1.2/30
//! ```
//!
//! A cut brings the cloud end of the uplink down: the edge's interface stays up and what
//! it sends is dropped without an error, as when a gateway's uplink dies upstream.
use std::process::Command;

use anyhow::{Context, bail};

pub(crate) const EDGE_NS: &str = "rillcmp-edge";
pub(crate) const CLOUD_NS: &str = "rillcmp-cloud";
/// The cloud as the edge servers reach it (over the uplink).
pub(crate) const CLOUD_UPLINK_IP: &str = "10.231.0.2";
/// The cloud as the harness reaches it (over the management link).
pub(crate) const CLOUD_MGMT_IP: &str = "10.231.1.2";
const UPLINK_CLOUD_END: &str = "rcup-c";

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The namespaces, deleted on drop (with their veth pairs).
pub(crate) struct Namespaces;

impl Namespaces {
    /// Creates both namespaces and their links, deleting leftovers of an interrupted run.
    pub(crate) fn create() -> anyhow::Result<Namespaces> {
        remove();
        ip(&["netns", "add", EDGE_NS])?;
        let ns = Namespaces;
        ip(&["netns", "add", CLOUD_NS])?;
        for (e, c) in [("rcup-e", "rcup-c"), ("rcmg-e", "rcmg-c")] {
            ip(&["link", "add", e, "netns", EDGE_NS, "type", "veth", "peer", "name", c, "netns", CLOUD_NS])?;
        }
        for (ns, dev, addr) in [
            (EDGE_NS, "rcup-e", "10.231.0.1/30"),
            (EDGE_NS, "rcmg-e", "10.231.1.1/30"),
            (CLOUD_NS, "rcup-c", "10.231.0.2/30"),
            (CLOUD_NS, "rcmg-c", "10.231.1.2/30"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        for ns in [EDGE_NS, CLOUD_NS] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        remove();
    }
}

fn remove() {
    for ns in [EDGE_NS, CLOUD_NS] {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
}

/// Cuts (`false`) or restores (`true`) the uplink.
pub(crate) fn set_uplink(up: bool) -> anyhow::Result<()> {
    ip(&["-n", CLOUD_NS, "link", "set", UPLINK_CLOUD_END, if up { "up" } else { "down" }])
}

/// A command that runs in the cloud namespace.
pub(crate) fn in_cloud(program: &std::path::Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", CLOUD_NS]).arg(program);
    c
}
