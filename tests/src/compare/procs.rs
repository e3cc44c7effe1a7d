//! Server processes the benchmark starts: killed on drop, with their logs kept for errors.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// A running server.
pub(crate) struct Server {
    name: String,
    child: Child,
    log: PathBuf,
    /// The server's own pid (`ip netns exec` execs the program, so it is the child's).
    pid: u32,
}

impl Server {
    /// Starts `command`, its output to `<dir>/<name>.log`.
    pub(crate) fn start(name: &str, mut command: Command, dir: &Path) -> anyhow::Result<Server> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        let pid = child.id();
        Ok(Server { name: name.to_string(), child, log, pid })
    }

    /// The tail of its log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails if the server has exited.
    pub(crate) fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); its log ends:\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    fn status_kib(&self, key: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let line = status.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key}"))?;
        Ok(line.split_whitespace().nth(1).context("a value")?.parse()?)
    }

    /// Resident memory now, KiB.
    pub(crate) fn rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmRSS:")
    }

    /// Peak resident memory since start, KiB.
    pub(crate) fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmHWM:")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `ready` every 20 ms until it answers true, for at most `limit`.
pub(crate) async fn wait_until<F, Fut>(what: &str, limit: Duration, mut ready: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !ready().await {
        if started.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(started.elapsed())
}
