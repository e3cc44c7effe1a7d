//! Bad input gets a clear error and the node keeps serving.
use rill_node::{
    client::{ClientError, Outgoing},
    protocol::{ErrorCode, Request, Response, StartPosition},
};
use rill_transport::frame;

use crate::support::{TestNode, text};

/// The node still accepts and serves a normal produce.
async fn still_serves(node: &TestNode) {
    let client = node.client().await;
    let mut p = client.producer("ok/ok/ok", "health".into()).await.expect("producer");
    p.send(vec![Outgoing::payload("alive")]).await.expect("send");
    p.close().await.expect("the node still acknowledges produces");
}

fn refused(r: Result<impl std::fmt::Debug, ClientError>) -> (ErrorCode, String) {
    match r {
        Err(ClientError::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_and_oversized_messages_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "names");
    let client = node.client().await;
    for (topic, want) in [("acme/bad name/x", "'bad name'"), ("acme/x", "tenant/namespace/topic"), ("a/../b", "'..'")] {
        let (code, message) = refused(client.producer(topic, "p".into()).await);
        assert_eq!(code, ErrorCode::InvalidName);
        assert!(message.contains(want), "{topic}: {message}");
    }
    let (code, message) = refused(client.subscribe("t/n/x", "bad sub", StartPosition::Earliest).await);
    assert!(code == ErrorCode::InvalidName && message.contains("'bad sub'"), "{message}");
    let (code, message) = refused(client.producer("t/n/x", "$fn/mine".into()).await);
    assert!(code == ErrorCode::InvalidName && message.contains("reserved for operators"), "{message}");
    // A batch mixing chosen and assigned seqs is refused before anything is sent.
    let mut chosen = client.producer_with_seqs("t/n/x", "c".into()).await.expect("producer");
    let mixed = vec![Outgoing::payload("a").with_seq(1), Outgoing::payload("b")];
    let err = chosen.send(mixed.clone()).await.expect_err("a mixed batch");
    assert!(err.to_string().contains("1 message(s) carry none"), "{err}");
    let mut assigned = client.producer("t/n/x", "a".into()).await.expect("producer");
    let err = assigned.send(mixed).await.expect_err("a mixed batch");
    assert!(err.to_string().contains("1 message(s) carry one"), "{err}");
    assert_eq!((chosen.in_flight(), assigned.in_flight()), (0, 0), "nothing was sent");

    let mut p = client.producer("t/n/big", "p".into()).await.expect("producer");
    p.send(vec![Outgoing::payload("fits"), Outgoing::payload(vec![0u8; (1 << 20) + 1])]).await.expect("send");
    let (code, message) = refused(p.next_ack().await);
    assert_eq!(code, ErrorCode::TooLarge);
    assert!(message.contains("message_bytes_max") && message.contains("nothing in this batch was stored"), "{message}");
    let topics = client.list_topics().await.expect("topics");
    assert_eq!(topics.iter().find(|t| t.topic == "t/n/big").map(|t| t.end_offset), Some(0), "the batch is atomic");
    still_serves(&node).await;
}

/// Sends raw bytes on a fresh stream and returns the node's answer.
async fn raw_exchange(node: &TestNode, bytes: &[u8]) -> Response {
    let client = node.client().await;
    let (mut send, mut recv) = client.open_stream().await.expect("stream");
    send.write_all(bytes).await.expect("write");
    let _ = send.finish();
    let mut buf = Vec::new();
    frame::read_frame::<_, Response>(&mut recv, 1 << 20, &mut buf).await.expect("a readable answer").expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_frames_get_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "frames");
    let cases: [(&[u8], ErrorCode, &str); 4] = [
        (&[0xff, 0xff, 0xff, 0xff], ErrorCode::TooLarge, "exceeds the limit of 16777216 bytes"),
        (&[0, 0, 0, 3, 1, 0xee, 0xee], ErrorCode::Malformed, "malformed frame"),
        (&[0, 0, 0, 2, 7, 0], ErrorCode::Malformed, "frame version 7 is not supported"),
        (&[0, 0, 0, 0], ErrorCode::Malformed, "empty frame"),
    ];
    for (bytes, want_code, want) in cases {
        match raw_exchange(&node, bytes).await {
            Response::Error { code, message } => {
                assert!(code == want_code && message.contains(want), "{bytes:?}: {message}")
            }
            other => panic!("{bytes:?}: {other:?}"),
        }
    }
    // A valid frame whose request is out of place.
    let mut buf = Vec::new();
    frame::encode(&Request::Ack { offsets: vec![1] }, &mut buf).expect("encode");
    assert!(matches!(raw_exchange(&node, &buf).await, Response::Error { code: ErrorCode::Malformed, .. }));
    still_serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_from_another_ca_is_refused_at_the_handshake() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "mtls");
    let foreign = tmp.path().join("foreign");
    rill_transport::certs::create_ca(&foreign).expect("foreign CA");
    rill_transport::certs::issue_client(&foreign).expect("foreign client");
    // Trust the node's CA (so the client would accept the node) but present a foreign cert.
    std::fs::copy(node.data_dir.join("certs/ca.pem"), foreign.join("ca.pem")).expect("copy CA");
    let mut options = node.options();
    options.certs_dir = foreign;
    let result = async {
        let client = rill_node::client::Client::connect(&options).await?;
        client.list_topics().await
    }
    .await;
    let err = result.expect_err("the node must refuse a certificate from another CA").to_string();
    assert!(err.to_lowercase().contains("certificate") || err.contains("closed") || err.contains("connect"), "{err}");
    assert!(node.wait_for_log("client handshake failed"), "the node logs the refusal:\n{}", node.log());
    still_serves(&node).await;
}

#[test]
fn an_unusable_data_dir_is_named_at_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, "x").expect("file");
    let data = file.join("data");
    let err = TestNode::start_with(tmp.path(), "nodir", &["--data-dir", data.to_str().expect("utf-8")])
        .err()
        .expect("the node must refuse to start");
    assert!(err.contains("data dir") && err.contains(&data.display().to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_segment_is_reported_with_file_and_position_and_other_topics_serve() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut node = TestNode::start(tmp.path(), "corrupt");
    let client = node.client().await;
    for topic in ["t/n/damaged", "t/n/healthy"] {
        let mut p = client.producer(topic, "p".into()).await.expect("producer");
        for b in 0..3 {
            p.send((0..10).map(|i| Outgoing::payload(format!("{b}-{i}"))).collect()).await.expect("send");
            p.flush().await.expect("ack"); // one frame per batch
        }
    }
    drop(client);
    node.stop();
    let segment = node.data_dir.join("topics/t/n/damaged/00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).expect("segment");
    let third = bytes.len() / 2; // inside the second of three frames
    bytes[third] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("write");
    node.restart();

    let out = node.cli(&["consume", "t/n/healthy", "-s", "s", "-n", "30"], "");
    assert_eq!(text(&out.stdout).lines().count(), 30, "{}", text(&out.stderr));
    let client = node.client().await;
    let (code, message) = refused(client.producer("t/n/damaged", "p".into()).await);
    assert_eq!(code, ErrorCode::Storage);
    let out = node.cli(&["topics", "list"], "");
    assert!(
        text(&out.stdout).contains("t/n/damaged") && text(&out.stdout).contains("UNAVAILABLE"),
        "{}",
        text(&out.stdout)
    );
    // The node runs with the default relative data dir, so the file is named relative to it.
    let named = "rill-data/topics/t/n/damaged/00000000000000000000.log at byte";
    assert!(message.contains("corrupt log segment") && message.contains(named), "{message}");
    still_serves(&node).await;
}
