//! The `rill` command line. This is the program's `main` layer: it parses flags, sets up
//! logging and reports errors with `anyhow`; everything it does goes through the library.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

mod access;
mod bench;
mod certs;
mod conflicts;
mod consume;
mod functions;
mod node;
mod ns;
mod produce;
mod stats;
mod subs;
mod topics;

/// Default address of client commands.
const DEFAULT_ADDR: &str = "127.0.0.1:7400";
/// Default certificate directory of client commands: the dev certificates a node made
/// under its default data dir, so a newcomer's client works with no flags.
const DEFAULT_CERTS: &str = "./rill-data/certs";

/// rill: a geo-replicated edge-to-cloud streaming mesh.
#[derive(Debug, Parser)]
#[command(name = "rill", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run or manage a node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Make certificates for a mesh.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Produce messages: stdin lines, a file's lines, or synthetic load.
    Produce(produce::ProduceArgs),
    /// Consume messages from a durable subscription, printing one per line.
    Consume(consume::ConsumeArgs),
    /// Namespaces: create, set the nodes that hold them, set policies, show.
    #[command(subcommand)]
    Ns(ns::NsCommand),
    /// Topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Subscriptions: list them, move one to an offset or a time, reset one.
    #[command(subcommand)]
    Subs(subs::SubsCommand),
    /// Replicated messages this node kept aside: their id was held with another content.
    #[command(subcommand)]
    Conflicts(ConflictsCommand),
    /// Node statistics: per topic messages, bytes, offsets, subscriptions.
    Stats(stats::StatsArgs),
    /// Allow a principal an action on a tenant or one namespace (needs admin over it).
    Grant(access::GrantArgs),
    /// Take a grant back (every node stops honouring it as the catalogue converges).
    Revoke(access::GrantArgs),
    /// Grants: list them.
    #[command(subcommand)]
    Grants(access::GrantsCommand),
    /// Bearer tokens (for the HTTP and MQTT doors): create, revoke, list.
    #[command(subcommand)]
    Tokens(access::TokensCommand),
    /// Who this client is to the node, and its grants.
    Whoami(access::WhoAmIArgs),
    /// Stream functions (WebAssembly): create, list, update, pause, resume, delete; test
    /// a module locally.
    #[command(subcommand)]
    Fn(functions::FnCommand),
    /// Benchmarks (print figures; not tests).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Run a node in the foreground until Ctrl-C or SIGTERM.
    Run(node::RunArgs),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a CA, node certificates and a client certificate in a directory.
    Init {
        /// Directory to write into (created; must not already hold a CA).
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Comma-separated node names.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
    },
    /// Issue a client certificate for a principal from the mesh CA.
    Issue(access::IssueArgs),
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// List topics with their offsets and sizes.
    List(topics::TopicsListArgs),
}

#[derive(Debug, Subcommand)]
enum ConflictsCommand {
    /// List them: topic, id, the offset of the content the log holds, the peer it came from.
    List(conflicts::ConflictsListArgs),
}

/// Where a client command connects.
#[derive(Debug, Clone, Args)]
pub(crate) struct Conn {
    /// Node address.
    #[arg(long, default_value = DEFAULT_ADDR)]
    addr: SocketAddr,
    /// Directory with ca.pem and the client identity's certificate and key.
    #[arg(long, default_value = DEFAULT_CERTS)]
    certs: PathBuf,
    /// The client identity: `<certs>/<identity>.pem` and `.key` (made by `rill certs
    /// issue`); the default `client` is the superuser `admin`.
    #[arg(long, default_value = rill_transport::certs::DEFAULT_IDENTITY)]
    identity: String,
}

impl Conn {
    /// Connects, runs `act`, and closes the connection whatever `act` returned.
    pub(crate) async fn run<T>(
        &self,
        act: impl AsyncFnOnce(&crate::client::Client) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let client = self.connect().await?;
        let result = act(&client).await;
        client.close().await;
        result
    }

    /// Connects, with an error that says what to check.
    pub(crate) async fn connect(&self) -> anyhow::Result<crate::client::Client> {
        use anyhow::Context;
        let options = crate::client::ClientOptions::new(self.addr, &self.certs).with_identity(&self.identity);
        crate::client::Client::connect(&options).await.with_context(|| {
            format!(
                "is a node running at {}, and is identity '{}' in {}?",
                self.addr,
                self.identity,
                self.certs.display()
            )
        })
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Runs the command line; the process's exit status follows the result.
pub fn main() -> std::process::ExitCode {
    main_with(crate::env::Env::production())
}

/// [`main`] with the environment `rill node run` starts its node in: test binaries pass
/// one with a fault switched on (the `rill` binary has no such switch).
pub fn main_with(env: crate::env::Env) -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_log = if matches!(cli.command, Command::Node(_)) { "info" } else { "warn" };
    init_tracing(default_log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, env)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, env: crate::env::Env) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(NodeCommand::Run(args)) => node::run(args, env).await,
        Command::Certs(CertsCommand::Init { dir, nodes }) => certs::init(&dir, &nodes),
        Command::Certs(CertsCommand::Issue(args)) => access::issue(&args),
        Command::Grant(args) => access::grant(args).await,
        Command::Revoke(args) => access::revoke(args).await,
        Command::Grants(cmd) => access::grants(cmd).await,
        Command::Tokens(cmd) => access::tokens(cmd).await,
        Command::Whoami(args) => access::who_am_i(args).await,
        Command::Fn(cmd) => functions::manage(cmd).await,
        Command::Produce(args) => produce::run(args).await,
        Command::Consume(args) => consume::run(args).await,
        Command::Ns(cmd) => ns::run(cmd).await,
        Command::Topics(TopicsCommand::List(args)) => topics::list(args).await,
        Command::Subs(cmd) => subs::run(cmd).await,
        Command::Stats(args) => stats::run(args).await,
        Command::Conflicts(ConflictsCommand::List(args)) => conflicts::list(args).await,
        Command::Bench(cmd) => bench::run(cmd).await,
    }
}
