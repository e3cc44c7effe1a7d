//! The file system under the segment log, behind a trait so that the simulation can run
//! the same segment code on a disk that loses unsynced writes on a crash.
//!
//! Costs and atomicity: `write_at` only reaches the page cache; nothing is durable until
//! `sync_data` returns (the costly call: one device flush). A new file's directory entry
//! is durable only after `sync_dir` on its parent.
use std::{
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
};

/// An open segment file, shared between the appender, the syncer and readers; all
/// methods take `&self` and use positional I/O.
pub trait LogFile: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `position`; returns how many were read (0 at end).
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `position` (to the page cache; not durable).
    fn write_all_at(&self, buf: &[u8], position: u64) -> io::Result<()>;
    /// Makes all written data durable (fdatasync). The expensive call.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True when the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Directory and file operations the log needs.
pub trait FileSystem: Send + Sync + fmt::Debug {
    /// Opens a file for reading and writing, creating it if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn LogFile>>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Lists the entries of a directory (full paths), in no particular order.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>>;
    /// True when `path` is a directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes a directory's entries durable (fsync on the directory).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// The real file system (std::fs).
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

#[derive(Debug)]
struct StdFile(std::fs::File);

impl LogFile for StdFile {
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.0, buf, position)
    }
    fn write_all_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, position)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl FileSystem for StdFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn LogFile>> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        Ok(Arc::new(StdFile(file)))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(path)?.map(|e| e.map(|e| e.path())).collect()
    }
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
}

/// The real file system with every opened file wrapped, and directory syncs passed to
/// `sync_dir`: how a test puts a fault, a cap or a recorder in front of the disk without
/// writing the rest of [`FileSystem`] again.
pub struct WrappedStdFs {
    wrap: Box<WrapFile>,
    sync_dir: Box<SyncDir>,
}

/// What [`WrappedStdFs`] puts around each opened file.
type WrapFile = dyn Fn(Arc<dyn LogFile>) -> Arc<dyn LogFile> + Send + Sync;
/// What [`WrappedStdFs`] does for a directory sync.
type SyncDir = dyn Fn(&Path) -> io::Result<()> + Send + Sync;

impl WrappedStdFs {
    /// Real files, each wrapped by `wrap` when opened; directory syncs are real.
    pub fn new(wrap: impl Fn(Arc<dyn LogFile>) -> Arc<dyn LogFile> + Send + Sync + 'static) -> WrappedStdFs {
        WrappedStdFs { wrap: Box::new(wrap), sync_dir: Box::new(|path| StdFs.sync_dir(path)) }
    }

    /// Directory syncs run `sync_dir` instead.
    pub fn with_sync_dir(self, sync_dir: impl Fn(&Path) -> io::Result<()> + Send + Sync + 'static) -> WrappedStdFs {
        WrappedStdFs { sync_dir: Box::new(sync_dir), ..self }
    }
}

impl fmt::Debug for WrappedStdFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WrappedStdFs")
    }
}

impl FileSystem for WrappedStdFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn LogFile>> {
        Ok((self.wrap)(StdFs.open(path, create)?))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        StdFs.create_dir_all(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        StdFs.read_dir(path)
    }
    fn is_dir(&self, path: &Path) -> bool {
        StdFs.is_dir(path)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdFs.remove_file(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        (self.sync_dir)(path)
    }
}

/// Creates `dir` and any missing parents, then syncs the parent of every directory it
/// created: a new directory entry survives a crash only once its parent is synced, and
/// without that a crash could drop a whole new topic, acknowledged messages included.
pub fn create_dir_durably(fs: &dyn FileSystem, dir: &Path) -> crate::error::Result<()> {
    let created: Vec<&Path> = dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !fs.is_dir(d)).collect();
    fs.create_dir_all(dir).map_err(|e| crate::error::StorageError::io(dir, e))?;
    for d in created {
        let parent = d.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs.sync_dir(parent).map_err(|e| crate::error::StorageError::io(parent, e))?;
    }
    Ok(())
}

/// Real files for tests, with faults: while `failing` is set, syncs and truncations (and,
/// with `fail_writes`, writes) fail with `errno` (EIO by default). Directory syncs are recorded.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct TestFs {
    pub(crate) failing: std::sync::atomic::AtomicBool,
    pub(crate) fail_writes: bool,
    /// The errno of the failures (0: EIO).
    pub(crate) errno: i32,
    pub(crate) dir_syncs: std::sync::Mutex<Vec<PathBuf>>,
}

#[cfg(test)]
impl TestFs {
    /// The file system whose files share this one's switch.
    pub(crate) fn root(fs: &Arc<TestFs>) -> WrappedStdFs {
        let (files, dirs) = (Arc::clone(fs), Arc::clone(fs));
        WrappedStdFs::new(move |file| Arc::new(TestFile(file, Arc::clone(&files)))).with_sync_dir(move |path| {
            dirs.dir_syncs.lock().expect("dir syncs").push(path.to_path_buf());
            StdFs.sync_dir(path)
        })
    }

    pub(crate) fn set_failing(&self, failing: bool) {
        self.failing.store(failing, std::sync::atomic::Ordering::Relaxed);
    }

    fn check(&self) -> io::Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(if self.errno == 0 { 5 } else { self.errno }));
        }
        Ok(())
    }
}

/// A file of a [`TestFs`].
#[cfg(test)]
#[derive(Debug)]
struct TestFile(Arc<dyn LogFile>, Arc<TestFs>);

#[cfg(test)]
impl LogFile for TestFile {
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<usize> {
        self.0.read_at(buf, position)
    }
    fn write_all_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        if self.1.fail_writes {
            self.1.check()?;
        }
        self.0.write_all_at(buf, position)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.1.check()?;
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.1.check()?;
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
}
