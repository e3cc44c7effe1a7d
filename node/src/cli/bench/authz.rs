//! `rill bench authz`: what the per-request grant check costs a producer.
use clap::Args;
use rill_replication::access::{Action, Body, Entry, Grant, Incarnation, Resource};

use super::{ChildNode, produce::Pipeline, support::median};
use crate::client::{Client, ClientOptions};

/// Flags of `rill bench authz`.
#[derive(Debug, Args)]
pub(crate) struct AuthzArgs {
    /// Each round (a produce request per batch: one grant check).
    #[command(flatten)]
    pipeline: Pipeline,
    /// Rounds per identity, alternating.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Directory for the node's scratch data dir.
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
}

/// One throughput round on its own topic: messages per second with durable acks.
async fn round(options: &ClientOptions, topic: &str, a: &AuthzArgs) -> anyhow::Result<f64> {
    let client = Client::connect(options).await?;
    let mut p = client.producer(topic, "bench".into()).await?;
    let (acked, secs) = a.pipeline.run(&mut p).await?;
    client.close().await;
    Ok(acked as f64 / secs)
}

pub(crate) async fn run(a: AuthzArgs) -> anyhow::Result<()> {
    let node = ChildNode::start(&a.dir)?;
    let superuser = node.options();
    rill_transport::certs::issue_principal(&superuser.certs_dir, "bench-device", "bench-device", false)?;
    let device = node.options().with_identity("bench-device");
    let admin = Client::connect(&superuser).await?;
    let grant = Grant {
        principal: "bench-device".into(),
        action: Action::Produce,
        resource: Resource::parse("bench/authz").map_err(anyhow::Error::msg)?,
    };
    let body = Body::Create { incarnation: Incarnation(1), entry: Entry::Grant(grant) };
    admin.catalogue_edit(admin.sign(body, crate::cli::access::now_ms())?).await?;
    admin.close().await;
    eprintln!(
        "bench authz: {} rounds each of {} x {} B in batches of {}, {} in flight; superuser and granted principal alternate",
        a.rounds, a.pipeline.messages, a.pipeline.size, a.pipeline.batch, a.pipeline.window
    );
    let (mut su, mut granted) = (Vec::new(), Vec::new());
    for r in 0..a.rounds {
        // Alternate which goes first, so a drift of the machine favours neither.
        let order = if r % 2 == 0 { [true, false] } else { [false, true] };
        for is_su in order {
            let topic = format!("bench/authz/{}-{r}", if is_su { "su" } else { "device" });
            let rate = round(if is_su { &superuser } else { &device }, &topic, &a).await?;
            eprintln!("  round {r} {}: {rate:.0} msgs/s", if is_su { "superuser" } else { "principal" });
            if is_su {
                su.push(rate)
            } else {
                granted.push(rate)
            };
        }
    }
    let spread = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{lo:.0}..{hi:.0}")
    };
    let (ms, mg) = (median(su.clone()), median(granted.clone()));
    println!(
        "authz: superuser median {ms:.0} msgs/s ({}), granted principal median {mg:.0} msgs/s ({}), ratio {:.3} (target >= 0.97)",
        spread(&su),
        spread(&granted),
        mg / ms
    );
    Ok(())
}
