//! A full disk, through the storage's file-system trait (mounting a small tmpfs needs
//! privileges CI may not have): the node runs in this process over real QUIC on loopback,
//! on real files whose total size is capped.
use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rill_node::{
    Node,
    client::{Client, ClientError, ClientOptions, Outgoing},
    config::NodeConfig,
    env::Env,
    protocol::{ErrorCode, StartPosition},
};
use rill_storage::fs::{LogFile, WrappedStdFs};

/// Real files, refusing with ENOSPC any write that would grow them past `capacity` bytes
/// in total.
#[derive(Debug, Default)]
struct SmallDisk {
    used: AtomicU64,
    capacity: AtomicU64,
}

#[derive(Debug)]
struct CappedFile(Arc<dyn LogFile>, Arc<SmallDisk>);

impl LogFile for CappedFile {
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<usize> {
        self.0.read_at(buf, position)
    }
    fn write_all_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        let growth = (position + buf.len() as u64).saturating_sub(self.0.len()?);
        let disk = &self.1;
        if disk.used.load(Ordering::SeqCst) + growth > disk.capacity.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        self.0.write_all_at(buf, position)?;
        disk.used.fetch_add(growth, Ordering::SeqCst);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let before = self.0.len()?;
        self.0.set_len(len)?;
        if len < before {
            self.1.used.fetch_sub(before - len, Ordering::SeqCst);
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
}

async fn produce(client: &Client, producer: &str, from: usize, n: usize) -> Result<(), ClientError> {
    let mut p = client.producer("t/n/x", producer.into()).await?;
    p.send((from..from + n).map(|i| Outgoing::payload(format!("{i:0200}"))).collect()).await?;
    p.flush().await.map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_produces_keeps_serving_and_recovers_when_space_returns() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = Arc::new(SmallDisk { capacity: AtomicU64::new(256 << 10), ..SmallDisk::default() });
    let config = NodeConfig {
        name: Some("small".into()),
        data_dir: tmp.path().join("data"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..NodeConfig::default()
    };
    let certs = config.dev_certs_dir();
    let capped = Arc::clone(&disk);
    let fs = WrappedStdFs::new(move |file| Arc::new(CappedFile(file, Arc::clone(&capped))));
    let env = Env { fs: Arc::new(fs), ..Env::production() };
    let node = Node::start(config, env).await.expect("start");
    let client = Client::connect(&ClientOptions::new(node.local_addr(), &certs)).await.expect("connect");
    let mut stored = 0;
    let full = loop {
        match produce(&client, &format!("p{stored}"), stored, 100).await {
            Ok(()) => stored += 100,
            Err(e) => break e,
        }
        assert!(stored < 100_000, "the disk never filled");
    };
    assert!(matches!(&full, ClientError::Refused { code: ErrorCode::DiskFull, .. }) && full.is_retriable(), "{full}");
    assert!(full.to_string().contains("No space left on device"), "{full}");
    // Consumers and statistics keep working on a full disk.
    let mut c = client.subscribe("t/n/x", "s", StartPosition::Earliest).await.expect("subscribe");
    for want in 0..stored as u64 {
        let m = tokio::time::timeout(Duration::from_secs(10), c.next()).await.expect("delivered");
        assert_eq!(m.expect("next").expect("message").offset, want);
        c.ack(want);
    }
    c.close().await.expect("close");
    let still = produce(&client, "still-full", 0, 100).await.expect_err("still full");
    assert!(matches!(still, ClientError::Refused { code: ErrorCode::DiskFull, .. }), "{still}");
    // Space returns: the node takes writes again by itself, and nothing was torn.
    disk.capacity.store(u64::MAX, Ordering::SeqCst);
    produce(&client, "after", 0, 100).await.expect("produce after space returned");
    let stats = client.stats().await.expect("stats");
    assert_eq!(stats.topics[0].end_offset, stored as u64 + 100);
    node.shutdown().await;
}
