//! `rill bench functions`: a map over 256-byte JSON sensor messages run by the node as a
//! WebAssembly function (`functions/examples/scale.wasm`: finds one numeric field by
//! scanning bytes and scales it exactly), against the same transform in native Rust,
//! run as a client that consumes and produces with durable acks, in the same run.
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rill_replication::{
    access::{Body, Entry, Incarnation},
    function::{FunctionDef, Start},
};
use tokio::time::Instant;

use super::ChildNode;
use crate::{
    client::{Client, Outgoing},
    protocol::StartPosition,
};

/// The example module, built from `functions/examples/scale.c`.
const SCALE_WASM: &[u8] = include_bytes!("../../../../functions/examples/scale.wasm");

/// Flags of `rill bench functions`.
#[derive(Debug, Args)]
pub(crate) struct FunctionsArgs {
    /// Input messages.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Directory for the node's scratch data dir.
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
}

/// A 256-byte JSON reading whose field `t` is `i / 100`.
fn reading(i: u64) -> String {
    let head =
        format!("{{\"device\":\"gw-{:03}\",\"seq\":{i},\"t\":{}.{:02},\"pad\":\"", i % 100, i / 100 % 1000, i % 100);
    format!("{head}{}\"}}", "x".repeat(256 - head.len() - 2))
}

/// The native transform: the value of `"t":` times 0.5, exactly, as the module does.
fn scale_native(payload: &[u8]) -> Vec<u8> {
    let Some(at) = payload.windows(4).position(|w| w == b"\"t\":").map(|p| p + 4) else { return payload.to_vec() };
    let end = payload[at..]
        .iter()
        .position(|b| !(b.is_ascii_digit() || *b == b'.' || *b == b'-'))
        .map_or(payload.len(), |n| at + n);
    let number = std::str::from_utf8(&payload[at..end]).unwrap_or("");
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let (Ok(mantissa), decimals) = (format!("{int}{frac}").parse::<i64>(), frac.len() as u32 + 1) else {
        return payload.to_vec();
    };
    let (mut m, mut d) = (mantissa * 5, decimals);
    while d > 0 && m % 10 == 0 {
        m /= 10;
        d -= 1;
    }
    let digits = format!("{:0>width$}", m.unsigned_abs(), width = d as usize + 1);
    let (i, f) = digits.split_at(digits.len() - d as usize);
    let sign = if m < 0 { "-" } else { "" };
    let scaled = if d == 0 { format!("{sign}{i}") } else { format!("{sign}{i}.{f}") };
    [&payload[..at], scaled.as_bytes(), &payload[end..]].concat()
}

async fn end_of(client: &Client, topic: &str) -> anyhow::Result<u64> {
    Ok(client.list_topics().await?.iter().find(|t| t.topic == topic).map_or(0, |t| t.end_offset))
}

pub(crate) async fn run(a: FunctionsArgs) -> anyhow::Result<()> {
    let node = ChildNode::start(&a.dir)?;
    let client = Client::connect(&node.options()).await?;
    eprintln!("bench functions: {} x 256 B JSON readings, scale one field by 0.5", a.messages);
    let mut p = client.producer_with_seqs("bench/fx/in", "sensor".into()).await?;
    for start in (0..a.messages).step_by(1000) {
        let batch = (start..(start + 1000).min(a.messages)).map(|i| Outgoing::payload(reading(i)).with_seq(i));
        p.send(batch.collect()).await?;
        while p.in_flight() > 16 {
            p.next_ack().await?;
        }
    }
    p.close().await?;

    // WebAssembly, in the node: from the definition to the last durable output.
    let started = Instant::now();
    let module = client.put_blob("bench/fx", SCALE_WASM.to_vec()).await?;
    let def = FunctionDef {
        name: "bench/fx/scale".into(),
        module,
        inputs: vec!["bench/fx/in".into()],
        outputs: vec!["bench/fx/out-wasm".into()],
        nodes: None,
        start: Start::Earliest,
        params: vec![("scale".into(), "0.5".into())],
        paused: false,
    };
    let body = Body::Create { incarnation: Incarnation(1), entry: Entry::Function(def) };
    client.catalogue_edit(client.sign(body, crate::cli::access::now_ms())?).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while end_of(&client, "bench/fx/out-wasm").await? < a.messages {
        anyhow::ensure!(Instant::now() < deadline, "the function did not finish in 10 minutes:\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wasm_secs = started.elapsed().as_secs_f64();

    // Native Rust, as a client: consume, transform, produce with durable acks.
    let started = Instant::now();
    let mut consumer = client.subscribe("bench/fx/in", "native", StartPosition::Earliest).await?;
    let mut out = client.producer_with_seqs("bench/fx/out-native", "native".into()).await?;
    let mut batch = Vec::new();
    for _ in 0..a.messages {
        let m = consumer.next().await?.context("the input ended early")?;
        batch.push(Outgoing::payload(scale_native(&m.message.payload)).with_seq(m.message.id.seq));
        consumer.ack(m.offset);
        if batch.len() == 256 {
            out.send(std::mem::take(&mut batch)).await?;
            while out.in_flight() > 16 {
                out.next_ack().await?;
            }
        }
    }
    if !batch.is_empty() {
        out.send(batch).await?;
    }
    out.close().await?;
    let native_secs = started.elapsed().as_secs_f64();

    // Both give the same bytes.
    let mut check = client.subscribe("bench/fx/out-wasm", "check", StartPosition::Earliest).await?;
    let first = check.next().await?.context("an output")?;
    anyhow::ensure!(first.message.payload == scale_native(reading(0).as_bytes()), "the two transforms differ");
    client.close().await;
    let (wasm_rate, native_rate) = (a.messages as f64 / wasm_secs, a.messages as f64 / native_secs);
    println!(
        "functions: wasm in the node {wasm_rate:.0} msgs/s ({wasm_secs:.2} s), native Rust as a client {native_rate:.0} msgs/s ({native_secs:.2} s), ratio {:.2} (targets: >= 200000 msgs/s, >= 0.3)",
        wasm_rate / native_rate
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_256_bytes_and_the_native_transform_scales_exactly() {
        assert_eq!(reading(12345).len(), 256);
        let scaled = String::from_utf8(scale_native(reading(12345).as_bytes())).unwrap();
        assert!(scaled.contains("\"t\":61.725,"), "{scaled}");
        assert!(String::from_utf8(scale_native(b"{\"t\":4}")).unwrap().contains("\"t\":2"));
        assert_eq!(scale_native(b"{\"t\":-3}"), b"{\"t\":-1.5}");
        assert_eq!(scale_native(b"no field"), b"no field");
    }
}
