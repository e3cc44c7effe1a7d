//! powerfs: a FUSE file system that forgets what was not synced, for power-loss tests of
//! real rill processes (a kill -9 keeps the kernel's page cache; a power cut does not).
//!
//! [`volume`] holds the state and the rules (which writes and directory entries a cut
//! keeps); this module puts it behind FUSE. Every file is opened with direct I/O and
//! attributes and entries are never cached, and [`Mounted::cut`] also unmounts and mounts
//! again, so nothing the kernel cached can outlive a cut.
//!
//! Mounting needs root and `/dev/fuse` (fuser without libfuse mounts directly).
use std::{
    ffi::OsStr,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

pub mod volume;

pub use volume::CutReport;
use volume::{Node, Volume};

/// Attributes and entries are never cached by the kernel.
const TTL: Duration = Duration::ZERO;

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn attr(ino: u64, node: &Node) -> FileAttr {
    let (kind, perm, size) = match node {
        Node::File(data) => (FileType::RegularFile, 0o644, data.len() as u64),
        Node::Dir(_) => (FileType::Directory, 0o755, 0),
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind,
        perm,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The FUSE side of a [`Volume`].
struct PowerFs {
    volume: Arc<Mutex<Volume>>,
    /// How long a file sync takes, as on a disk (directory syncs are instant).
    sync_delay: Duration,
}

impl PowerFs {
    fn volume(&self) -> MutexGuard<'_, Volume> {
        self.volume.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn entry(&self, ino: Result<u64, i32>, reply: ReplyEntry) {
        let volume = self.volume();
        match ino.and_then(|i| volume.node(i).map(|n| attr(i, n)).ok_or(libc::ENOENT)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn empty(result: Result<(), i32>, reply: ReplyEmpty) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ino = self.volume().lookup(parent.0, name);
        self.entry(ino, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.volume().node(ino.0) {
            Some(n) => reply.attr(&TTL, &attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut volume = self.volume();
        if let Some(len) = size
            && let Err(e) = volume.truncate(ino.0, len)
        {
            return reply.error(errno(e));
        }
        match volume.node(ino.0) {
            Some(n) => reply.attr(&TTL, &attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let ino = self.volume().create(parent.0, name, false);
        self.entry(ino, reply);
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        let ino = self.volume().create(parent.0, name, true);
        self.entry(ino, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.volume().remove(parent.0, name, false), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.volume().remove(parent.0, name, true), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.volume().rename(parent.0, name, newparent.0, newname), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.volume().node(ino.0) {
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.volume().read(ino.0, offset, size as usize) {
            Ok(data) => reply.data(data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.volume().write(ino.0, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        std::thread::sleep(self.sync_delay);
        Self::empty(self.volume().sync(ino.0), reply);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let volume = self.volume();
        let entries = match volume.entries(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        let dots = [(OsStr::new(".").to_os_string(), ino.0), (OsStr::new("..").to_os_string(), ino.0)];
        for (i, (name, child)) in dots.into_iter().chain(entries).enumerate().skip(offset as usize) {
            let kind = match volume.node(child) {
                Some(Node::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        Self::empty(self.volume().sync(ino.0), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 24, 1 << 24, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut volume = self.volume();
        match volume.create(parent.0, name, false) {
            Ok(ino) => {
                let a = attr(ino, volume.node(ino).expect("just created"));
                reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
            }
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// A mounted powerfs. Unmounted on drop.
pub struct Mounted {
    volume: Arc<Mutex<Volume>>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    sync_delay: Duration,
}

impl Mounted {
    /// Mounts an empty volume at `mountpoint` (an existing directory), each file sync
    /// taking `sync_delay`.
    pub fn mount(mountpoint: &Path, sync_delay: Duration) -> io::Result<Mounted> {
        let mut m = Mounted {
            volume: Arc::new(Mutex::new(Volume::default())),
            session: None,
            mountpoint: mountpoint.to_path_buf(),
            sync_delay,
        };
        m.attach()?;
        Ok(m)
    }

    fn attach(&mut self) -> io::Result<()> {
        let fs = PowerFs { volume: Arc::clone(&self.volume), sync_delay: self.sync_delay };
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("powerfs".into()), MountOption::RW];
        self.session = Some(fuser::spawn_mount2(fs, &self.mountpoint, &config)?);
        Ok(())
    }

    fn detach(&mut self) -> io::Result<()> {
        match self.session.take() {
            Some(s) => match s.umount_and_join() {
                // The unmount went through; the session's reader then saw the kernel end
                // the connection as aborted rather than gone: with FUSE_ABORT_ERROR
                // negotiated, fuse_dev_do_read fails with ECONNABORTED where it would
                // give ENODEV, which fuser 0.17 takes as the only clean end (fixed
                // upstream in cberner/fuser#708). Either way the mount is gone. Seen once
                // in CI.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => Ok(()),
                other => other,
            },
            None => Ok(()),
        }
    }

    /// The power cut: unmounts (every process using the mount must be gone), drops what
    /// was not synced, and mounts again.
    pub fn cut(&mut self) -> io::Result<CutReport> {
        self.detach()?;
        let report = self.volume().power_cut();
        self.attach()?;
        Ok(report)
    }

    /// Turns the power off at a moment when some written data is not yet synced (polling
    /// for up to `wait`), so that the cut that follows drops something. Returns false if
    /// everything stayed synced that long (the power is then off all the same).
    pub fn power_off_while_unsynced(&self, wait: Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let mut volume = self.volume();
            if volume.has_unsynced() || std::time::Instant::now() >= deadline {
                let unsynced = volume.has_unsynced();
                volume.power_off();
                return unsynced;
            }
            drop(volume);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The volume, to inspect it or to make it ignore syncs.
    pub fn volume(&self) -> MutexGuard<'_, Volume> {
        self.volume.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}
