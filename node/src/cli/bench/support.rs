//! What the benchmarks share: scratch directories, a node in a child process, payloads,
//! medians.
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, bail};

use crate::client::{ClientOptions, Outgoing};

/// The median of `v` (the upper one of an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn tempfile_in(dir: &Path) -> anyhow::Result<TempDir> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!(".rill-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(TempDir(path))
}

/// A scratch directory removed on drop.
pub(crate) struct TempDir(std::path::PathBuf);

impl TempDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node in a child process on a scratch data dir, killed on drop.
pub(crate) struct ChildNode {
    child: Child,
    pub(crate) addr: std::net::SocketAddr,
    data: TempDir,
}

impl ChildNode {
    pub(crate) fn start(scratch_parent: &Path) -> anyhow::Result<ChildNode> {
        Self::start_with(tempfile_in(scratch_parent)?, &["--name", "bench-node", "--listen", "127.0.0.1:0"])
    }

    /// A node on data dir `data` with extra flags for `rill node run`.
    pub(crate) fn start_with(data: TempDir, flags: &[&str]) -> anyhow::Result<ChildNode> {
        let exe = std::env::current_exe()?;
        let log_path = data.path().with_extension("log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(exe)
            .args(["node", "run"])
            .args(flags)
            .arg("--data-dir")
            .arg(data.path())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting the node")?;
        let stdout = child.stdout.take().context("node stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().rsplit(' ').next().and_then(|a| a.parse().ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("node did not report its address; its log:\n{log}");
        };
        Ok(ChildNode { child, addr, data })
    }

    pub(crate) fn options(&self) -> ClientOptions {
        ClientOptions::new(self.addr, self.data.path().join("certs"))
    }

    /// The node's log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().with_extension("log")).unwrap_or_default()
    }

    /// SIGTERM and a clean exit (the node flushes its metadata); the data dir stays until
    /// this value is dropped.
    pub(crate) fn stop(&mut self) -> anyhow::Result<std::path::PathBuf> {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        anyhow::ensure!(status.success(), "could not signal the node");
        let exit = self.child.wait()?;
        anyhow::ensure!(exit.success(), "the node did not stop cleanly: {exit}");
        Ok(self.data.path().to_path_buf())
    }

    pub(crate) fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
        Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The log sits beside the scratch data dir, which removes only itself.
        let _ = std::fs::remove_file(self.data.path().with_extension("log"));
    }
}

pub(crate) fn payloads(n: usize, size: usize) -> Vec<Outgoing> {
    (0..n).map(|_| Outgoing::payload(vec![0x5a; size])).collect()
}
