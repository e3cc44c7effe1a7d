//! One segment file: frames appended at the end, a sparse in-memory offset index, and
//! recovery that tells a torn tail (truncated) from corruption (refused).
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    error::{Result, StorageError},
    format::{self, FRAME_HEADER_BYTES, FrameHeader},
    fs::{FileSystem, LogFile},
    message::StoredMessage,
};

/// Name of the segment file whose first offset is `base_offset`.
pub fn file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.log")
}

/// The base offset encoded in a segment file name, if it is one.
pub fn parse_file_name(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

/// An open segment.
#[derive(Debug)]
pub struct Segment {
    path: PathBuf,
    file: Arc<dyn LogFile>,
    base_offset: u64,
    next_offset: u64,
    len_bytes: u64,
    /// Bytes known durable; readers never look past this.
    synced_bytes: u64,
    /// (first offset of a frame, its byte position), one entry per `index_interval_bytes`.
    index: Vec<(u64, u64)>,
    index_interval_bytes: u64,
}

/// What recovery found in a segment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Bytes of torn tail that were cut off.
    pub truncated_bytes: u64,
}

impl Segment {
    /// Creates a new empty segment file and makes its directory entry durable.
    pub fn create(fs: &dyn FileSystem, dir: &Path, base_offset: u64, index_interval_bytes: u64) -> Result<Self> {
        let path = dir.join(file_name(base_offset));
        let file = fs.open(&path, true).map_err(|e| StorageError::io(&path, e))?;
        fs.sync_dir(dir).map_err(|e| StorageError::io(dir, e))?;
        Ok(Segment::empty(path, file, base_offset, index_interval_bytes))
    }

    /// A segment with nothing read or written yet.
    fn empty(path: PathBuf, file: Arc<dyn LogFile>, base_offset: u64, index_interval_bytes: u64) -> Self {
        Segment {
            path,
            file,
            base_offset,
            next_offset: base_offset,
            len_bytes: 0,
            synced_bytes: 0,
            index: Vec::new(),
            index_interval_bytes,
        }
    }

    /// Opens an existing segment.
    ///
    /// Sealed segments (`last: None`) were synced before the next one was created, so any
    /// damage found in their frame headers is corruption; their frame bodies are checked
    /// when read. The last segment (`last: Some(durable_through)`) is fully checked, and
    /// where a frame is damaged:
    /// - at or above `durable_through` (an offset below which everything was synced), it is
    ///   what a crash left of unsynced writes, which the disk may have kept in any order and
    ///   in part: the segment is cut there, even if whole frames follow;
    /// - below it, the damage is in synced data: corruption, refused;
    /// - with no `durable_through` known, it is a torn tail unless a valid frame follows.
    pub fn open(
        fs: &dyn FileSystem,
        path: &Path,
        base_offset: u64,
        last: Option<Option<u64>>,
        index_interval_bytes: u64,
    ) -> Result<(Self, Recovered)> {
        let is_last = last.is_some();
        let file = fs.open(path, false).map_err(|e| StorageError::io(path, e))?;
        let file_len = file.len().map_err(|e| StorageError::io(path, e))?;
        let mut seg = Segment::empty(path.to_path_buf(), file, base_offset, index_interval_bytes);
        let mut position = 0;
        while position < file_len {
            match seg.check_frame_at(position, file_len, is_last) {
                Ok((header, prefix)) => {
                    if prefix.base_offset != seg.next_offset {
                        return Err(seg.corruption(
                            position,
                            format!("frame starts at offset {}, expected {}", prefix.base_offset, seg.next_offset),
                        ));
                    }
                    seg.note_frame(prefix.base_offset, u64::from(prefix.count), position, header.frame_bytes());
                    position += header.frame_bytes();
                }
                Err(reason) if is_last => {
                    match last.flatten() {
                        Some(durable) if seg.next_offset < durable => {
                            return Err(seg.corruption(
                                position,
                                format!("{reason}, at offset {} which was synced (below {durable})", seg.next_offset),
                            ));
                        }
                        Some(_) => {}
                        None if seg.valid_frame_after(position, file_len)? => {
                            return Err(seg.corruption(position, format!("{reason}, and valid frames follow it")));
                        }
                        None => {}
                    }
                    tracing::warn!(path = %seg.path.display(), position, torn_bytes = file_len - position,
                        %reason, "truncating torn tail of log segment");
                    seg.file.set_len(position).map_err(|e| StorageError::io(path, e))?;
                    seg.file.sync_data().map_err(|e| StorageError::io(path, e))?;
                    seg.synced_bytes = seg.len_bytes;
                    return Ok((seg, Recovered { truncated_bytes: file_len - position }));
                }
                Err(reason) => return Err(seg.corruption(position, reason)),
            }
        }
        seg.synced_bytes = seg.len_bytes;
        Ok((seg, Recovered::default()))
    }

    fn corruption(&self, position: u64, reason: String) -> StorageError {
        StorageError::Corruption { path: self.path.clone(), position, reason }
    }

    fn read_exact_at(&self, buf: &mut [u8], position: u64) -> Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .file
                .read_at(&mut buf[done..], position + done as u64)
                .map_err(|e| StorageError::io(&self.path, e))?;
            if n == 0 {
                return Ok(false);
            }
            done += n;
        }
        Ok(true)
    }

    /// Validates the frame at `position`: header, bounds, and (if `full`) its checksum.
    /// An `Err` is the reason the frame is not valid; I/O errors are reported as reasons too
    /// so that recovery treats an unreadable tail like a torn one.
    fn check_frame_at(
        &self,
        position: u64,
        file_len: u64,
        full: bool,
    ) -> Result<(FrameHeader, format::BodyPrefix), String> {
        let mut head = [0u8; FRAME_HEADER_BYTES + format::BODY_PREFIX_BYTES];
        if position + head.len() as u64 > file_len {
            return Err(format!("incomplete frame header ({} bytes left)", file_len - position));
        }
        self.read_exact_at(&mut head, position).map_err(|e| e.to_string())?;
        let header = format::parse_header(head[..FRAME_HEADER_BYTES].try_into().expect("12-byte slice"))?;
        if position + header.frame_bytes() > file_len {
            return Err(format!("frame of {} bytes runs past the end of the file", header.frame_bytes()));
        }
        let prefix = format::parse_prefix(&head[FRAME_HEADER_BYTES..])?;
        if full {
            let mut body = vec![0u8; header.body_len as usize];
            self.read_exact_at(&mut body, position + FRAME_HEADER_BYTES as u64).map_err(|e| e.to_string())?;
            format::check_body(&header, &body)?;
        }
        Ok((header, prefix))
    }

    /// True when some byte position after `bad` starts a frame that passes every check: the
    /// sign that `bad` is damage in the middle of live data, not a torn tail.
    fn valid_frame_after(&self, bad: u64, file_len: u64) -> Result<bool> {
        let mut rest = vec![0u8; (file_len - bad) as usize];
        self.read_exact_at(&mut rest, bad)?;
        let magic = format::FRAME_MAGIC.to_le_bytes();
        for at in 1..rest.len().saturating_sub(FRAME_HEADER_BYTES) {
            if rest[at..at + 4] == magic && self.check_frame_at(bad + at as u64, file_len, true).is_ok() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn note_frame(&mut self, base_offset: u64, count: u64, position: u64, frame_bytes: u64) {
        let due = self.index.last().is_none_or(|&(_, p)| position >= p + self.index_interval_bytes);
        if due {
            self.index.push((base_offset, position));
        }
        self.next_offset = base_offset + count;
        self.len_bytes = position + frame_bytes;
    }

    /// Appends an encoded frame holding offsets `base_offset..base_offset + count`. On a
    /// failed write the file is cut back to its previous length.
    pub fn append(&mut self, frame: &[u8], base_offset: u64, count: u64) -> Result<()> {
        debug_assert_eq!(base_offset, self.next_offset);
        let position = self.len_bytes;
        if let Err(e) = self.file.write_all_at(frame, position) {
            // Best effort: a partial frame past len_bytes is overwritten by the next append
            // or cut off by recovery.
            let _ = self.file.set_len(position);
            return Err(StorageError::io(&self.path, e));
        }
        self.note_frame(base_offset, count, position, frame.len() as u64);
        Ok(())
    }

    /// Reads messages with offsets >= `from_offset` from durable frames, appending to `out`
    /// until `max_messages` or `max_bytes` (at frame granularity; at least one frame).
    pub fn read(
        &self,
        from_offset: u64,
        max_messages: usize,
        max_bytes: usize,
        out: &mut Vec<StoredMessage>,
    ) -> Result<()> {
        self.read_frames(self.synced_bytes, from_offset, max_messages, max_bytes, out)
    }

    /// Like [`Segment::read`], but also from frames written and not yet synced.
    pub fn read_written(&self, from_offset: u64, max_messages: usize, out: &mut Vec<StoredMessage>) -> Result<()> {
        self.read_frames(self.len_bytes, from_offset, max_messages, usize::MAX, out)
    }

    fn read_frames(
        &self,
        end_bytes: u64,
        from_offset: u64,
        max_messages: usize,
        max_bytes: usize,
        out: &mut Vec<StoredMessage>,
    ) -> Result<()> {
        let start = match self.index.partition_point(|&(o, _)| o <= from_offset) {
            0 => 0,
            i => self.index[i - 1].1,
        };
        let (mut position, mut bytes) = (start, 0usize);
        let first = out.len();
        while position < end_bytes && out.len() - first < max_messages && (bytes < max_bytes || out.len() == first) {
            let (header, prefix) =
                self.check_frame_at(position, end_bytes, false).map_err(|r| self.corruption(position, r))?;
            if prefix.base_offset + u64::from(prefix.count) > from_offset {
                let mut body = vec![0u8; header.body_len as usize];
                if !self.read_exact_at(&mut body, position + FRAME_HEADER_BYTES as u64)? {
                    return Err(self.corruption(position, "frame body cut short".into()));
                }
                format::check_body(&header, &body).map_err(|r| self.corruption(position, r))?;
                format::decode_body(&body, from_offset, out).map_err(|r| self.corruption(position, r))?;
                bytes += body.len();
            }
            position += header.frame_bytes();
        }
        out.truncate(first + max_messages);
        Ok(())
    }

    /// Bytes from the frame holding `offset` to the end, to within one index interval
    /// (an over-estimate: the index points at or before the frame).
    pub fn bytes_from(&self, offset: u64) -> u64 {
        if offset >= self.next_offset {
            return 0;
        }
        let position = match self.index.partition_point(|&(o, _)| o <= offset) {
            0 => 0,
            i => self.index[i - 1].1,
        };
        self.len_bytes.saturating_sub(position)
    }

    /// The file, for syncing outside the log's lock.
    pub fn file(&self) -> &Arc<dyn LogFile> {
        &self.file
    }
    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// First offset of the segment.
    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }
    /// One past the last offset written.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }
    /// Bytes known to be on disk (synced).
    pub fn synced_bytes(&self) -> u64 {
        self.synced_bytes
    }
    /// Bytes appended (synced or not).
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }
    /// Marks the first `bytes` bytes durable.
    pub fn set_synced(&mut self, bytes: u64) {
        self.synced_bytes = self.synced_bytes.max(bytes.min(self.len_bytes));
    }
}
