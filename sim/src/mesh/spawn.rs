//! One node on a simulated host.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use rill_node::{
    Node,
    config::{NodeConfig, PeerConfig, TlsConfig},
};
use rill_storage::NodeName;

use crate::{
    client::{PORT, node_addr},
    env::{Bugs, Host, sim_env},
    net::{Loss, SimNet, Trace},
};

/// How long a supervisor waits before starting a node that failed to start again.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Starts one node on a simulated host: a supervisor restarts it when it fails to start
/// (a failing disk), as systemd would.
pub(crate) struct NodeSpawn {
    pub(crate) seed: u64,
    pub(crate) host: Host,
    pub(crate) trace: Arc<Trace>,
    pub(crate) loss: Arc<Loss>,
    /// Boots over the whole mesh: each boot's randomness is salted with its number.
    pub(crate) boots: Arc<Mutex<u64>>,
    pub(crate) bugs: Bugs,
}

impl NodeSpawn {
    /// Adds the host; `config` runs inside the simulation, where names resolve.
    pub(crate) fn add(self, sim: &mut turmoil::Sim<'_>, name: &str, config: impl Fn() -> NodeConfig + 'static) {
        let host_name = name.to_string();
        sim.host(name, move || {
            let (seed, host, bugs) = (self.seed, self.host.clone(), self.bugs);
            let (trace, loss) = (Arc::clone(&self.trace), Arc::clone(&self.loss));
            let boot = {
                let mut b = self.boots.lock().expect("boots lock");
                *b += 1;
                *b
            };
            let (config, host_name) = (config(), host_name.clone());
            async move {
                for attempt in 0u64.. {
                    let boot_seed = seed.wrapping_mul(1_000_003).wrapping_add(boot).wrapping_add(attempt << 32);
                    let ip = turmoil::lookup(host_name.as_str());
                    let net = SimNet::new(boot_seed, Arc::clone(&trace)).with_loss(ip, Arc::clone(&loss));
                    match Node::start(config.clone(), sim_env(boot_seed, &host, net, bugs)).await {
                        Ok(_node) => std::future::pending::<()>().await,
                        Err(e) => tracing::warn!(node = %host_name, error = %e, "node did not start; starting again"),
                    }
                    tokio::time::sleep(RESTART_PAUSE).await;
                }
                Ok(())
            }
        });
    }
}

/// A node's configuration in the simulation: links as (dialer, listener).
pub(crate) fn node_config(name: &str, certs: &Path, links: &[(String, String)]) -> NodeConfig {
    let peers = links
        .iter()
        .filter_map(|(a, b)| {
            let peer = |n: &str| NodeName::parse(n).expect("node names are checked by the builder");
            match (a == name, b == name) {
                (true, _) => Some(PeerConfig { name: peer(b), addr: Some(node_addr(b)) }),
                (_, true) => Some(PeerConfig { name: peer(a), addr: None }),
                _ => None,
            }
        })
        .collect();
    NodeConfig {
        name: Some(name.into()),
        data_dir: PathBuf::from("/data"),
        listen: (std::net::Ipv4Addr::UNSPECIFIED, PORT).into(),
        tls: TlsConfig {
            ca: Some(certs.join("ca.pem")),
            cert: Some(certs.join(format!("{name}.pem"))),
            key: Some(certs.join(format!("{name}.key"))),
        },
        peers,
        ..NodeConfig::default()
    }
}
