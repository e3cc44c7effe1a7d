//! The disk in simulation: turmoil's simulated file system, where writes are pending until
//! synced and a crash drops what was not, behind the log's `FileSystem` trait.
use std::{
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use rill_storage::fs::{FileSystem, LogFile};
use turmoil::fs::shim::std::fs as sfs;

/// A host's disk faults, switched by the harness: while failing, every write, sync,
/// truncation and file creation fails with EIO, and a failing write first writes half its
/// bytes (a torn write).
#[derive(Debug, Default)]
pub struct DiskFaults {
    failing: AtomicBool,
}

impl DiskFaults {
    /// Starts or stops failing.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    fn check(&self) -> io::Result<()> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        Ok(())
    }
}

/// turmoil's file system for the host the caller runs on.
#[derive(Debug, Default, Clone)]
pub struct SimFs {
    /// Test-only injected bug: `sync_data` returns without syncing, so the node
    /// acknowledges writes a crash can still take back. The sweep must catch it.
    pub bug_skip_sync: bool,
    /// The host's disk faults.
    pub faults: Arc<DiskFaults>,
}

#[derive(Debug)]
struct SimFile {
    file: sfs::File,
    bug_skip_sync: bool,
    faults: Arc<DiskFaults>,
}

impl LogFile for SimFile {
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<usize> {
        FileExt::read_at(&self.file, buf, position)
    }
    fn write_all_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        if let Err(e) = self.faults.check() {
            FileExt::write_all_at(&self.file, &buf[..buf.len() / 2], position)?;
            return Err(e);
        }
        FileExt::write_all_at(&self.file, buf, position)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.faults.check()?;
        if self.bug_skip_sync {
            return Ok(());
        }
        self.file.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.faults.check()?;
        self.file.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

impl FileSystem for SimFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn LogFile>> {
        if create {
            self.faults.check()?;
        }
        let file = sfs::OpenOptions::new().read(true).write(true).create(create).open(path)?;
        Ok(Arc::new(SimFile { file, bug_skip_sync: self.bug_skip_sync, faults: Arc::clone(&self.faults) }))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.faults.check()?;
        sfs::create_dir_all(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        sfs::read_dir(path)?.map(|e| e.map(|e| e.path())).collect()
    }
    fn is_dir(&self, path: &Path) -> bool {
        sfs::metadata(path).is_ok_and(|m| m.is_dir())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        sfs::remove_file(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.faults.check()?;
        sfs::sync_dir(path)
    }
}
