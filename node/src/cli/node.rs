//! `rill node run`.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::Args;

use crate::{Node, config::NodeConfig, env::Env};

/// Flags of `rill node run`; each overrides the config file.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// TOML config file (see configs/edge.toml for every key and default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory [default: ./rill-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client listen address [default: 127.0.0.1:7400].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Node name [default: the host name].
    #[arg(long)]
    name: Option<String>,
}

pub(crate) async fn run(args: RunArgs, env: Env) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::load(path)?,
        None => NodeConfig::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if args.name.is_some() {
        config.name = args.name;
    }
    let node = Node::start(config, env).await.context("node failed to start")?;
    // Tests and scripts read this line to learn the address (the port may be 0).
    println!("rill node {} listening on {}", node.name(), node.local_addr());
    wait_for_signal().await;
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
