//! The file system's state, without FUSE: a live tree (what programs see) over a durable
//! tree (what a power cut leaves). Everything lives in memory.
//!
//! What becomes durable, and when:
//! - a file's contents and size, when the file is synced (fsync or fdatasync);
//! - a directory's entries (creates, unlinks, renames in it), when the directory is
//!   synced. An inode an entry names that was never synced itself survives empty (its
//!   metadata is durable, its data is not).
//!
//! A cut ([`Volume::power_cut`]) makes the live tree the durable one: every write,
//! truncation and entry change since the last sync of its file or directory is gone.
//! This goes one step beyond LazyFS, which writes entry changes straight through.
use std::{
    collections::{BTreeMap, HashMap},
    ffi::{OsStr, OsString},
};

/// The root directory's inode number.
pub const ROOT: u64 = 1;

/// One inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A regular file.
    File(Vec<u8>),
    /// A directory: name -> inode.
    Dir(BTreeMap<OsString, u64>),
}

/// Why an operation failed, as an errno.
pub type Errno = i32;

/// What a cut dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Bytes of file contents written since their file's last sync (differing bytes plus
    /// the change in length), over the files that survive or were reachable.
    pub bytes_dropped: u64,
    /// Directory entries created, removed or renamed since their directory's last sync.
    pub entries_undone: u64,
}

/// The live and the durable tree.
#[derive(Debug)]
pub struct Volume {
    live: HashMap<u64, Node>,
    durable: HashMap<u64, Node>,
    next_ino: u64,
    /// Syncs are skipped (the volume's own "bug" switch, for its tests).
    syncs_ignored: bool,
    /// The power is off: every operation fails with EIO until the cut.
    off: bool,
}

impl Default for Volume {
    fn default() -> Self {
        let root = HashMap::from([(ROOT, Node::Dir(BTreeMap::new()))]);
        Volume { live: root.clone(), durable: root, next_ino: ROOT + 1, syncs_ignored: false, off: false }
    }
}

impl Volume {
    /// The live inode.
    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.live.get(&ino)
    }

    fn dir(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        if self.off {
            return Err(libc::EIO);
        }
        match self.live.get(&ino) {
            Some(Node::Dir(entries)) => Ok(entries),
            Some(Node::File(_)) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        if self.off {
            return Err(libc::EIO);
        }
        match self.live.get_mut(&ino) {
            Some(Node::Dir(entries)) => Ok(entries),
            Some(Node::File(_)) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut Vec<u8>, Errno> {
        if self.off {
            return Err(libc::EIO);
        }
        match self.live.get_mut(&ino) {
            Some(Node::File(data)) => Ok(data),
            Some(Node::Dir(_)) => Err(libc::EISDIR),
            None => Err(libc::ENOENT),
        }
    }

    /// The inode `name` in directory `parent` names.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?.get(name).copied().ok_or(libc::ENOENT)
    }

    /// The entries of a directory, in name order.
    pub fn entries(&self, dir: u64) -> Result<Vec<(OsString, u64)>, Errno> {
        Ok(self.dir(dir)?.iter().map(|(n, i)| (n.clone(), *i)).collect())
    }

    /// Creates an empty file (`dir` false) or directory named `name` in `parent`.
    pub fn create(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<u64, Errno> {
        if self.dir(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.live.insert(ino, if dir { Node::Dir(BTreeMap::new()) } else { Node::File(Vec::new()) });
        self.dir_mut(parent)?.insert(name.to_os_string(), ino);
        Ok(ino)
    }

    /// Removes the entry `name` from `parent`: a file (`dir` false) or an empty directory.
    /// The inode stays while it may be open; a cut forgets it if nothing durable names it.
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        match (self.live.get(&ino), dir) {
            (Some(Node::Dir(_)), false) => return Err(libc::EISDIR),
            (Some(Node::File(_)), true) => return Err(libc::ENOTDIR),
            (Some(Node::Dir(entries)), true) if !entries.is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        self.dir_mut(parent)?.remove(name);
        Ok(())
    }

    /// Renames `parent/name` to `new_parent/new_name`, replacing a file there (or an empty
    /// directory, when a directory is renamed).
    pub fn rename(&mut self, parent: u64, name: &OsStr, new_parent: u64, new_name: &OsStr) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        if let Ok(existing) = self.lookup(new_parent, new_name) {
            match (self.live.get(&ino), self.live.get(&existing)) {
                (Some(Node::File(_)), Some(Node::Dir(_))) => return Err(libc::EISDIR),
                (Some(Node::Dir(_)), Some(Node::File(_))) => return Err(libc::ENOTDIR),
                (_, Some(Node::Dir(e))) if !e.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
        }
        self.dir(new_parent)?;
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(new_parent)?.insert(new_name.to_os_string(), ino);
        Ok(())
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, ino: u64, offset: u64, size: usize) -> Result<&[u8], Errno> {
        if self.off {
            return Err(libc::EIO);
        }
        match self.live.get(&ino) {
            Some(Node::File(data)) => {
                let start = (offset as usize).min(data.len());
                Ok(&data[start..(start + size).min(data.len())])
            }
            Some(Node::Dir(_)) => Err(libc::EISDIR),
            None => Err(libc::ENOENT),
        }
    }

    /// Writes `bytes` at `offset`, extending the file with zeros if needed.
    pub fn write(&mut self, ino: u64, offset: u64, bytes: &[u8]) -> Result<(), Errno> {
        let data = self.file_mut(ino)?;
        let end = offset as usize + bytes.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(bytes);
        Ok(())
    }

    /// Sets a file's length.
    pub fn truncate(&mut self, ino: u64, len: u64) -> Result<(), Errno> {
        self.file_mut(ino)?.resize(len as usize, 0);
        Ok(())
    }

    /// Makes an inode durable: a file's contents, or a directory's entries (an inode they
    /// name that was never synced becomes durable empty).
    pub fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        if self.off {
            return Err(libc::EIO);
        }
        let node = self.live.get(&ino).ok_or(libc::ENOENT)?.clone();
        if self.syncs_ignored {
            return Ok(());
        }
        if let Node::Dir(entries) = &node {
            for child in entries.values() {
                if !self.durable.contains_key(child) {
                    let empty = match self.live.get(child) {
                        Some(Node::Dir(_)) => Node::Dir(BTreeMap::new()),
                        _ => Node::File(Vec::new()),
                    };
                    self.durable.insert(*child, empty);
                }
            }
        }
        self.durable.insert(ino, node);
        Ok(())
    }

    /// Turns the power off: from now on every operation fails with EIO (a sync in flight
    /// never completes), until [`Volume::power_cut`].
    pub fn power_off(&mut self) {
        self.off = true;
    }

    /// Makes every later sync do nothing, as a disk that lies about its cache would.
    pub fn ignore_syncs(&mut self, ignored: bool) {
        self.syncs_ignored = ignored;
    }

    /// True when some reachable file or directory differs from what a cut would leave.
    pub fn has_unsynced(&self) -> bool {
        self.reachable(&self.live).iter().any(|ino| self.live.get(ino) != self.durable.get(ino))
    }

    /// The inodes reachable from the root in `tree`.
    fn reachable(&self, tree: &HashMap<u64, Node>) -> Vec<u64> {
        let mut out = vec![ROOT];
        let mut i = 0;
        while i < out.len() {
            if let Some(Node::Dir(entries)) = tree.get(&out[i]) {
                out.extend(entries.values().copied().filter(|c| tree.contains_key(c)));
            }
            i += 1;
        }
        out
    }

    /// The power cut: the live tree becomes what is durable and reachable from the root.
    pub fn power_cut(&mut self) -> CutReport {
        let report = self.unsynced();
        let keep = self.reachable(&self.durable);
        self.durable.retain(|ino, _| keep.contains(ino));
        self.live = self.durable.clone();
        self.off = false;
        report
    }

    /// What a cut now would drop.
    pub fn unsynced(&self) -> CutReport {
        let mut report = CutReport::default();
        for ino in self.reachable(&self.live) {
            match (self.live.get(&ino), self.durable.get(&ino)) {
                (Some(Node::File(now)), kept) => {
                    let kept: &[u8] = match kept {
                        Some(Node::File(k)) => k,
                        _ => &[],
                    };
                    let differing = now.iter().zip(kept).filter(|(a, b)| a != b).count();
                    report.bytes_dropped += (differing + now.len().abs_diff(kept.len())) as u64;
                }
                (Some(Node::Dir(now)), kept) => {
                    let empty = BTreeMap::new();
                    let kept = match kept {
                        Some(Node::Dir(k)) => k,
                        _ => &empty,
                    };
                    let changed = now.iter().filter(|(n, i)| kept.get(*n) != Some(i)).count();
                    let removed = kept.keys().filter(|n| !now.contains_key(*n)).count();
                    report.entries_undone += (changed + removed) as u64;
                }
                (None, _) => {}
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    /// A durable file `f` in the root with `bytes`.
    fn synced_file(v: &mut Volume, bytes: &[u8]) -> u64 {
        let f = v.create(ROOT, name("f"), false).unwrap();
        v.write(f, 0, bytes).unwrap();
        v.sync(f).unwrap();
        v.sync(ROOT).unwrap();
        f
    }

    #[test]
    fn an_unsynced_write_is_gone_after_a_cut_and_a_synced_one_stays() {
        let mut v = Volume::default();
        let f = synced_file(&mut v, b"kept");
        v.write(f, 4, b" and lost").unwrap();
        assert!(v.has_unsynced());
        assert_eq!(v.unsynced(), CutReport { bytes_dropped: 9, entries_undone: 0 });
        let report = v.power_cut();
        assert_eq!(v.read(f, 0, 100).unwrap(), b"kept");
        assert_eq!(report, CutReport { bytes_dropped: 9, entries_undone: 0 });
        assert!(!v.has_unsynced());
    }

    #[test]
    fn a_truncation_without_a_sync_is_undone() {
        let mut v = Volume::default();
        let f = synced_file(&mut v, b"0123456789");
        v.truncate(f, 3).unwrap();
        v.power_cut();
        assert_eq!(v.read(f, 0, 100).unwrap(), b"0123456789");
    }

    #[test]
    fn a_file_never_named_by_a_synced_directory_is_gone_even_with_synced_contents() {
        let mut v = Volume::default();
        let d = v.create(ROOT, name("d"), true).unwrap();
        v.sync(ROOT).unwrap();
        let f = v.create(d, name("new"), false).unwrap();
        v.write(f, 0, b"data").unwrap();
        v.sync(f).unwrap();
        let report = v.power_cut();
        assert_eq!(v.lookup(d, name("new")), Err(libc::ENOENT));
        assert_eq!(report.entries_undone, 1);
        assert!(v.node(f).is_none(), "nothing durable names it");
    }

    #[test]
    fn a_synced_directory_keeps_a_new_entry_but_not_its_unsynced_data() {
        let mut v = Volume::default();
        let f = v.create(ROOT, name("f"), false).unwrap();
        v.write(f, 0, b"data").unwrap();
        v.sync(ROOT).unwrap();
        v.power_cut();
        assert_eq!(v.lookup(ROOT, name("f")), Ok(f));
        assert_eq!(v.read(f, 0, 10).unwrap(), b"");
    }

    #[test]
    fn a_rename_and_an_unlink_without_a_directory_sync_are_undone() {
        let mut v = Volume::default();
        let f = synced_file(&mut v, b"x");
        v.rename(ROOT, name("f"), ROOT, name("g")).unwrap();
        v.power_cut();
        assert_eq!((v.lookup(ROOT, name("f")), v.lookup(ROOT, name("g"))), (Ok(f), Err(libc::ENOENT)));
        v.remove(ROOT, name("f"), false).unwrap();
        v.power_cut();
        assert_eq!(v.lookup(ROOT, name("f")), Ok(f));
        v.rename(ROOT, name("f"), ROOT, name("g")).unwrap();
        v.sync(ROOT).unwrap();
        v.power_cut();
        assert_eq!(v.lookup(ROOT, name("g")), Ok(f), "synced, the rename stays");
    }

    #[test]
    fn with_the_power_off_every_operation_fails_until_the_cut() {
        let mut v = Volume::default();
        let f = synced_file(&mut v, b"x");
        v.power_off();
        assert_eq!(v.write(f, 0, b"y"), Err(libc::EIO));
        assert_eq!(v.sync(f), Err(libc::EIO));
        assert_eq!(v.read(f, 0, 1), Err(libc::EIO));
        v.power_cut();
        assert_eq!(v.read(f, 0, 1).unwrap(), b"x");
    }

    #[test]
    fn ignored_syncs_keep_nothing_and_bad_calls_name_their_errno() {
        let mut v = Volume::default();
        v.ignore_syncs(true);
        synced_file(&mut v, b"x");
        v.power_cut();
        assert_eq!(v.lookup(ROOT, name("f")), Err(libc::ENOENT));
        let d = v.create(ROOT, name("d"), true).unwrap();
        v.create(d, name("x"), false).unwrap();
        assert_eq!(v.remove(ROOT, name("d"), true), Err(libc::ENOTEMPTY));
        assert_eq!(v.create(ROOT, name("d"), false), Err(libc::EEXIST));
        assert_eq!(v.write(d, 0, b"x"), Err(libc::EISDIR));
        assert_eq!(v.lookup(99, name("x")), Err(libc::ENOENT));
    }
}
