//! Frames on QUIC streams: `len u32 BE | version u8 | postcard(value)`, where `len` counts
//! the version byte and the value. The length is checked against a maximum before any
//! buffer is allocated, so a hostile peer cannot make a node allocate gigabytes.
use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version byte of the current frame encoding.
pub const FRAME_VERSION: u8 = 1;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The stream failed.
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The announced frame is larger than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The frame uses an encoding version this build does not speak.
    #[error("frame version {0} is not supported (this build speaks version {FRAME_VERSION})")]
    Version(u8),
    /// The frame could not be decoded.
    #[error("malformed frame: {0}")]
    Decode(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The frame is empty (no version byte).
    #[error("empty frame")]
    Empty,
}

/// Encodes `value` into `buf` (cleared first) as one frame.
pub fn encode<T: Serialize>(value: &T, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    buf.clear();
    buf.extend_from_slice(&[0, 0, 0, 0, FRAME_VERSION]);
    let mut out = postcard::to_extend(value, std::mem::take(buf)).map_err(|e| FrameError::Decode(e.to_string()))?;
    let len = u32::try_from(out.len() - 4).map_err(|_| FrameError::TooLarge { len: u32::MAX, max: u32::MAX })?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    *buf = out;
    Ok(())
}

/// Writes `value` as one frame, using `buf` as scratch space.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
    buf: &mut Vec<u8>,
) -> Result<(), FrameError> {
    encode(value, buf)?;
    w.write_all(buf).await?;
    Ok(())
}

/// Reads one frame of at most `max_bytes`. `Ok(None)` means the stream ended cleanly
/// between frames.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max_bytes: u32,
    buf: &mut Vec<u8>,
) -> Result<Option<T>, FrameError> {
    let mut len_bytes = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len_bytes[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(len_bytes);
    if len > max_bytes {
        return Err(FrameError::TooLarge { len, max: max_bytes });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    buf.clear();
    buf.resize(len as usize, 0);
    r.read_exact(buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    decode_body(buf).map(Some)
}

/// Decodes a frame's body: the version byte, then the value.
fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body[0] != FRAME_VERSION {
        return Err(FrameError::Version(body[0]));
    }
    postcard::from_bytes(&body[1..]).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Reads frames keeping its progress between calls, so that [`FrameReader::read`] is
/// cancel-safe: a read dropped part-way (a `select!` branch that lost) keeps the bytes it
/// had, and the next call continues the same frame. [`read_frame`] is not: it may have
/// consumed half a frame when dropped.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Bytes of the current frame (header included) read so far.
    have: usize,
}

impl FrameReader {
    /// Reads the next frame of at most `max_bytes`. `Ok(None)` means the stream ended
    /// cleanly between frames. Cancel-safe for readers whose `read` is (quinn's and
    /// tokio's are).
    pub async fn read<R: AsyncRead + Unpin, T: DeserializeOwned>(
        &mut self,
        r: &mut R,
        max_bytes: u32,
    ) -> Result<Option<T>, FrameError> {
        loop {
            let want = match self.body_len(max_bytes)? {
                None => 4,
                Some(len) => 4 + len as usize,
            };
            if want > 4 && self.have == want {
                self.have = 0;
                return decode_body(&self.buf[4..want]).map(Some);
            }
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            match r.read(&mut self.buf[self.have..want]).await? {
                0 if self.have == 0 => return Ok(None),
                0 => return Err(FrameError::Truncated),
                n => self.have += n,
            }
        }
    }

    /// The body length once the header is in, checked against the limit.
    fn body_len(&self, max_bytes: u32) -> Result<Option<u32>, FrameError> {
        if self.have < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("four bytes"));
        match len {
            0 => Err(FrameError::Empty),
            len if len > max_bytes => Err(FrameError::TooLarge { len, max: max_bytes }),
            len => Ok(Some(len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Msg {
        Hello { name: String, n: u64 },
        Bye,
    }

    /// Reads every frame, with `read_frame` and with a `FrameReader`; both must agree.
    async fn read_all(bytes: Vec<u8>, max: u32) -> Vec<Result<Option<Msg>, String>> {
        let plain = read_all_with(bytes.clone(), max, false).await;
        assert_eq!(plain, read_all_with(bytes, max, true).await);
        plain
    }

    async fn read_all_with(bytes: Vec<u8>, max: u32, stateful: bool) -> Vec<Result<Option<Msg>, String>> {
        let mut r = &bytes[..];
        let mut buf = Vec::new();
        let mut reader = FrameReader::default();
        let mut out = Vec::new();
        loop {
            let f = match stateful {
                false => read_frame::<_, Msg>(&mut r, max, &mut buf).await,
                true => reader.read::<_, Msg>(&mut r, max).await,
            };
            let f = f.map_err(|e| e.to_string());
            let end = !matches!(f, Ok(Some(_)));
            out.push(f);
            if end {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn round_trip() {
        let mut wire = Vec::new();
        let mut buf = Vec::new();
        write_frame(&mut wire, &Msg::Hello { name: "a".into(), n: 7 }, &mut buf).await.unwrap();
        write_frame(&mut wire, &Msg::Bye, &mut buf).await.unwrap();
        let got = read_all(wire, 1024).await;
        assert_eq!(got, vec![Ok(Some(Msg::Hello { name: "a".into(), n: 7 })), Ok(Some(Msg::Bye)), Ok(None)]);
    }

    #[tokio::test]
    async fn rejects_bad_frames_with_clear_errors() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0xff, 0xff, 0xff, 0xff], "exceeds the limit of 1024 bytes"),
            (vec![0, 0, 0, 2, 9, 0], "frame version 9 is not supported"),
            (vec![0, 0, 0, 3, 1, 0xee, 0xee], "malformed frame"),
            (vec![0, 0, 0, 9, 1, 0], "stream ended inside a frame"),
            (vec![0, 0], "stream ended inside a frame"),
            (vec![0, 0, 0, 0], "empty frame"),
        ];
        for (bytes, want) in cases {
            let got = read_all(bytes.clone(), 1024).await;
            let err = got.last().unwrap().as_ref().unwrap_err();
            assert!(err.contains(want), "{bytes:?}: {err}");
        }
    }

    #[tokio::test]
    async fn a_frame_reader_cancelled_mid_frame_loses_nothing() {
        let mut wire = Vec::new();
        let mut buf = Vec::new();
        write_frame(&mut wire, &Msg::Hello { name: "abc".into(), n: 7 }, &mut buf).await.unwrap();
        write_frame(&mut wire, &Msg::Bye, &mut buf).await.unwrap();
        let (mut tx, mut rx) = tokio::io::duplex(64);
        let mut reader = FrameReader::default();
        // Half of the first frame arrives; the read is cancelled while waiting for the rest.
        tx.write_all(&wire[..6]).await.unwrap();
        let wait = std::time::Duration::from_millis(20);
        assert!(tokio::time::timeout(wait, reader.read::<_, Msg>(&mut rx, 1024)).await.is_err());
        tx.write_all(&wire[6..]).await.unwrap();
        drop(tx);
        assert_eq!(reader.read(&mut rx, 1024).await.unwrap(), Some(Msg::Hello { name: "abc".into(), n: 7 }));
        assert_eq!(reader.read(&mut rx, 1024).await.unwrap(), Some(Msg::Bye));
        assert_eq!(reader.read::<_, Msg>(&mut rx, 1024).await.unwrap(), None);
    }
}
