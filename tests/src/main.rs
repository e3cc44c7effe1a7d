//! The node binary under end-to-end test: the same code as `rill` (`rill_node::cli`), built
//! in this package so that its tests can name it with `CARGO_BIN_EXE_rill-e2e`.
//!
//! One switch the `rill` binary does not have: `RILL_E2E_SKIP_FDATASYNC=1` makes the log's
//! file and directory syncs do nothing, so that the power-cut test can show that it
//! catches a node that acknowledges what is not on disk.
use std::{io, sync::Arc};

use rill_node::env::Env;
use rill_storage::fs::{LogFile, WrappedStdFs};

/// A real file whose syncs do nothing.
#[derive(Debug)]
struct SkipSyncFile(Arc<dyn LogFile>);

impl LogFile for SkipSyncFile {
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<usize> {
        self.0.read_at(buf, position)
    }
    fn write_all_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        self.0.write_all_at(buf, position)
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
}

fn main() -> std::process::ExitCode {
    let mut env = Env::production();
    if std::env::var_os("RILL_E2E_SKIP_FDATASYNC").is_some_and(|v| v == "1") {
        eprintln!("rill-e2e: RILL_E2E_SKIP_FDATASYNC=1: log syncs do nothing (a test of the tests)");
        let skip_syncs = WrappedStdFs::new(|file| Arc::new(SkipSyncFile(file))).with_sync_dir(|_| Ok(()));
        env.fs = Arc::new(skip_syncs);
    }
    rill_node::cli::main_with(env)
}
