//! Harness: real `rill` processes (the `rill-e2e` build of the same code) on 127.0.0.1,
//! each with its own data dir, every wait bounded.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use rill_node::{
    client::{Client, ClientOptions},
    protocol::StartPosition,
};
use rill_storage::StoredMessage;
use rill_transport::net::Limits;

/// Longest a node may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a CLI command may run.
pub(crate) const CLI_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_rill-e2e")
}

/// A node process.
pub(crate) struct TestNode {
    child: Option<Child>,
    pub(crate) addr: SocketAddr,
    pub(crate) cwd: PathBuf,
    pub(crate) data_dir: PathBuf,
    pub(crate) name: String,
    extra: Vec<String>,
    /// Client certificates (default: the node's dev certificates).
    pub(crate) certs: PathBuf,
    /// Environment variables of the node process.
    pub(crate) envs: Vec<(String, String)>,
}

/// Waits for a child to exit, at most `timeout`; kills it if it does not.
pub(crate) fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl TestNode {
    /// Starts a node in `cwd` with its data in `cwd/rill-data` (the default layout).
    pub(crate) fn start(cwd: &Path, name: &str) -> TestNode {
        Self::start_with(cwd, name, &[]).unwrap_or_else(|e| panic!("node {name} did not start: {e}"))
    }

    /// Starts a node with extra flags; `Err` holds its stderr when it exits instead.
    pub(crate) fn start_with(cwd: &Path, name: &str, extra: &[&str]) -> Result<TestNode, String> {
        Self::start_at(cwd, name, "127.0.0.1:0".parse().expect("address"), extra)
    }

    /// Starts a node listening on `addr`.
    pub(crate) fn start_at(cwd: &Path, name: &str, addr: SocketAddr, extra: &[&str]) -> Result<TestNode, String> {
        Self::start_at_with_env(cwd, name, addr, extra, &[])
    }

    /// Starts a node listening on `addr`, with environment variables.
    pub(crate) fn start_at_with_env(
        cwd: &Path,
        name: &str,
        addr: SocketAddr,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<TestNode, String> {
        let mut node = TestNode {
            child: None,
            addr,
            cwd: cwd.to_path_buf(),
            data_dir: cwd.join("rill-data"),
            name: name.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            certs: cwd.join("rill-data/certs"),
            envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        node.spawn()?;
        Ok(node)
    }

    fn log_path(&self) -> PathBuf {
        self.cwd.join(format!("{}.log", self.name))
    }

    fn spawn(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(&self.cwd).map_err(|e| e.to_string())?;
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).map_err(|e| e.to_string())?;
        let mut child = Command::new(bin())
            .current_dir(&self.cwd)
            .args(["node", "run", "--name", &self.name, "--listen", &self.addr.to_string()])
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
        match line.trim().rsplit(' ').next().and_then(|a| a.parse::<SocketAddr>().ok()) {
            Some(addr) if line.contains("listening on") => {
                self.addr = addr;
                self.child = Some(child);
                Ok(())
            }
            _ => {
                wait_exit(&mut child, Duration::from_secs(5));
                Err(std::fs::read_to_string(self.log_path()).unwrap_or_default())
            }
        }
    }

    /// kill -9.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let status = wait_exit(&mut c, Duration::from_secs(15));
            assert!(status.is_some_and(|s| s.success()), "node {} did not stop cleanly: {status:?}", self.name);
        }
    }

    /// Starts a node killed with [`TestNode::kill9`] again.
    pub(crate) fn start_again(&mut self) {
        self.spawn().unwrap_or_else(|e| panic!("node {} did not start again: {e}", self.name));
    }

    /// Starts the node again on the same address and data.
    pub(crate) fn restart(&mut self) {
        self.kill9();
        self.spawn().unwrap_or_else(|e| panic!("node {} did not restart: {e}", self.name));
    }

    /// Client options with a short idle timeout, so that a killed node is noticed fast.
    pub(crate) fn options(&self) -> ClientOptions {
        options(self.addr, &self.certs)
    }

    /// A client, retrying for up to 10 s: a node just (re)started may not answer yet, and
    /// on a loaded machine its first handshake can fail.
    pub(crate) async fn client(&self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Client::connect(&self.options()).await {
                Ok(client) => return client,
                Err(e) if Instant::now() >= deadline => panic!("connect to node {}: {e}\n{}", self.name, self.log()),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Waits up to 10 s for `needle` to appear in the node's log.
    pub(crate) fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The node's log so far (for assertion messages).
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs a client command against this node (with `--addr`; certificates from the
    /// default path relative to the node's working dir unless the node's are elsewhere).
    pub(crate) fn cli(&self, args: &[&str], stdin: &str) -> Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(["--addr".to_string(), self.addr.to_string()]);
        // Newcomer tests rely on the default certificate path; pass it only when it differs.
        if self.certs != self.cwd.join("rill-data/certs") && !args.contains(&"--certs") {
            all.extend(["--certs".to_string(), self.certs.display().to_string()]);
        }
        run(&self.cwd, &all, stdin)
    }
}

/// Client options for a node at `addr` with a short idle timeout, so that a killed node is
/// noticed fast (for clients that outlive a `TestNode` handle, such as producers).
pub(crate) fn options(addr: SocketAddr, certs: &Path) -> ClientOptions {
    let mut o = ClientOptions::new(addr, certs);
    o.limits = Limits { idle_timeout_ms: 1_000, keep_alive_ms: 200, ..Limits::default() };
    o
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the binary with `args` in `cwd`, feeding `stdin`, bounded by [`CLI_TIMEOUT`].
pub(crate) fn run(cwd: &Path, args: &[String], stdin: &str) -> Output {
    let mut child = Command::new(bin())
        .current_dir(cwd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the CLI");
    let mut input = child.stdin.take().expect("stdin");
    let text = stdin.to_string();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(text.as_bytes());
    });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = wait_exit(&mut child, CLI_TIMEOUT).unwrap_or_else(|| panic!("rill {args:?} timed out"));
    let _ = writer.join();
    Output { status, stdout: reader.join().unwrap_or_default(), stderr: err_reader.join().unwrap_or_default() }
}

/// Text of an output stream.
pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Reads `count` messages of `topic` from the start on a fresh subscription and returns
/// each producer's seqs in the order the node holds them; `inspect` sees every message.
pub(crate) async fn read_seqs(
    node: &TestNode,
    topic: &str,
    count: u64,
    mut inspect: impl FnMut(&StoredMessage),
) -> std::collections::BTreeMap<String, Vec<u64>> {
    let client = node.client().await;
    let mut consumer = client.subscribe(topic, "check", StartPosition::Earliest).await.expect("subscribe");
    let mut seqs: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for _ in 0..count {
        let next =
            tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("a delivery within 10 s");
        let m = next.expect("next").expect("a message");
        inspect(&m);
        seqs.entry(m.message.id.producer.as_str().to_string()).or_default().push(m.message.id.seq);
        consumer.ack(m.offset);
    }
    seqs
}

/// A `rill consume --format json` process whose printed messages are collected as they
/// arrive.
pub(crate) struct ConsumerProcess {
    child: Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl ConsumerProcess {
    /// Starts `rill consume TOPIC -s SUBSCRIPTION --format json` plus `extra` against `node`.
    pub(crate) fn start(node: &TestNode, topic: &str, subscription: &str, extra: &[&str]) -> ConsumerProcess {
        let mut child = Command::new(bin())
            .current_dir(&node.cwd)
            .args(["consume", topic, "-s", subscription, "--format", "json", "--addr", &node.addr.to_string()])
            .args(["--certs", &node.certs.display().to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn rill consume");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().expect("lines").push(v);
                }
            }
        });
        ConsumerProcess { child, lines }
    }

    /// The messages printed so far.
    pub(crate) fn messages(&self) -> Vec<serde_json::Value> {
        self.lines.lock().expect("lines").clone()
    }

    /// The offsets printed so far, in order.
    pub(crate) fn offsets(&self) -> Vec<u64> {
        self.messages().iter().filter_map(|m| m["offset"].as_u64()).collect()
    }

    /// Kills the process (SIGKILL).
    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits up to `timeout` for `done`, polling; true when it held.
pub(crate) async fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// Node names for a clusters edit.
pub(crate) fn nodes(names: &[&str]) -> std::collections::BTreeSet<rill_storage::NodeName> {
    names.iter().map(|n| rill_storage::NodeName::parse(n).expect("a valid node name")).collect()
}

/// Whether `doc` replicates `namespace` between nodes `a` and `b`.
pub(crate) fn replicates(doc: &rill_replication::namespace::ConfigDoc, namespace: &str, a: &str, b: &str) -> bool {
    let ns = rill_storage::NamespaceName::parse(namespace).expect("a valid namespace name");
    let name = |n: &str| rill_storage::NodeName::parse(n).expect("a valid node name");
    doc.replicates_between(&ns, &name(a), &name(b))
}
