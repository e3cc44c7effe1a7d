//! `rill bench`: benchmarks that print figures, each against a baseline measured in the
//! same run because these machines are noisy. Not tests: nothing here asserts.
mod authz;
mod functions;
mod meta;
mod produce;
mod replication;
mod rss;
mod storage;
mod subscriptions;
mod support;

use clap::Subcommand;

pub(crate) use self::support::{ChildNode, TempDir, payloads, tempfile_in};
use self::{meta::MetaArgs, produce::ProduceArgs, rss::RssArgs, storage::StorageArgs};

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Log append with one fdatasync per batch, against raw append + fdatasync.
    Storage(StorageArgs),
    /// Produce over QUIC on loopback to a node in a child process: throughput with one
    /// pipelined producer, and ack latency at a fixed rate.
    Produce(ProduceArgs),
    /// Produce throughput as a principal whose grant is checked per request, against a
    /// superuser, in alternating rounds on one node.
    Authz(authz::AuthzArgs),
    /// A WebAssembly map run by the node against the same transform in native Rust.
    Functions(functions::FunctionsArgs),
    /// Resident memory of an idle node holding many topics.
    Rss(RssArgs),
    /// Replication: backlog catch-up, steady-state lag, wire amplification.
    Replication(replication::ReplicationArgs),
    /// A Shared subscription with several consumers draining a backlog, one ack per
    /// message; the size of the ack state after.
    Subscriptions(subscriptions::SubscriptionArgs),
    /// The metadata store: flush latency (puts then one flush, as a checkpoint does) and
    /// reopen time of the metadata log, against sled (which it replaced) on the same disk.
    Meta(MetaArgs),
}

pub(crate) async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Storage(a) => storage::run(a).await,
        BenchCommand::Produce(a) => produce::run(a).await,
        BenchCommand::Authz(a) => authz::run(a).await,
        BenchCommand::Functions(a) => functions::run(a).await,
        BenchCommand::Rss(a) => rss::run(a).await,
        BenchCommand::Replication(a) => replication::run(a).await,
        BenchCommand::Subscriptions(a) => subscriptions::run(a).await,
        BenchCommand::Meta(a) => meta::run(a),
    }
}
