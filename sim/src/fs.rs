//! The disk in simulation: turmoil's simulated file system, where writes are pending until
//! synced and a crash drops what was not, behind the log's `FileSystem` trait.
use std::{
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rill_storage::fs::{FileSystem, LogFile};
use turmoil::fs::shim::std::fs as sfs;

/// turmoil's file system for the host the caller runs on.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimFs {
    /// Test-only injected bug: `sync_data` returns without syncing, so the node
    /// acknowledges writes a crash can still take back. The sweep must catch it.
    pub bug_skip_sync: bool,
}

#[derive(Debug)]
struct SimFile {
    file: sfs::File,
    bug_skip_sync: bool,
}

impl LogFile for SimFile {
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<usize> {
        FileExt::read_at(&self.file, buf, position)
    }
    fn write_all_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.file, buf, position)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.bug_skip_sync {
            return Ok(());
        }
        self.file.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

impl FileSystem for SimFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn LogFile>> {
        let file = sfs::OpenOptions::new().read(true).write(true).create(create).open(path)?;
        Ok(Arc::new(SimFile { file, bug_skip_sync: self.bug_skip_sync }))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
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
        sfs::sync_dir(path)
    }
}
