//! The durable spool: every audit record is appended here first (write-ahead),
//! then shipped to ClickHouse from a cursor. With no ClickHouse configured the
//! spool *is* the store.
//!
//! Layout of `<state_dir>/spool`:
//! - `seg-<id>.lgs`: append-only segments. A file header `LGSPOOL1`, then
//!   records: magic `LGR1` (u32 LE), payload length (u32 LE), CRC-32 of the
//!   payload (u32 LE), payload (postcard-encoded [`Record`](super::rows::Record)).
//!   Each appended batch is fsynced. A segment is closed at `SEGMENT_BYTES`.
//! - `cursor`: `<segment id> <offset>` of the first record not yet shipped,
//!   replaced atomically (rename). Losing it only means re-sending records that
//!   ClickHouse deduplicates (deterministic ids + `ReplacingMergeTree`).
//! - `quarantine/`: segments in which corrupt bytes were found, after their
//!   intact records were delivered.
//!
//! A torn tail of the newest segment (a crash mid-write) is cut off when the
//! writer opens the spool, and each run appends to a new segment; anywhere else, bytes that fail the magic, length or
//! checksum test are corruption: the reader skips to the next intact record.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

const FILE_MAGIC: &[u8; 8] = b"LGSPOOL1";
pub const HEADER_LEN: u64 = FILE_MAGIC.len() as u64;
const REC_MAGIC: u32 = u32::from_le_bytes(*b"LGR1");
const REC_HEADER: usize = 12;
/// Largest record accepted (a chunk row is at most the capture chunk size).
const MAX_RECORD: usize = 16 << 20;
pub const SEGMENT_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool segment {path} is not a loopgate spool segment (bad file header)")]
    NotASegment { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("seg-{id:016}.lgs"))
}

/// Segment ids present, oldest first.
pub fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("seg-")?
                .strip_suffix(".lgs")?
                .parse()
                .ok()
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Encodes one record frame.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&REC_MAGIC.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// What a scan of a byte range found.
#[derive(Debug, Default)]
pub struct Scan {
    /// (offset of the record's end, payload)
    pub records: Vec<(u64, Vec<u8>)>,
    /// Byte ranges that failed the checks and were skipped.
    pub corrupt: Vec<(u64, u64)>,
    /// Offset up to which the range was fully understood (records or
    /// corruption). Anything after it is an incomplete record at the end.
    pub end: u64,
}

/// Is there an intact record frame at `p`? Returns its total length.
fn frame_at(buf: &[u8], p: usize) -> Result<usize, bool> {
    // Err(true): incomplete (needs more bytes); Err(false): not a record.
    if buf.len() - p < REC_HEADER {
        return Err(true);
    }
    let word = |i: usize| u32::from_le_bytes(buf[p + i..p + i + 4].try_into().expect("4 bytes"));
    if word(0) != REC_MAGIC {
        return Err(false);
    }
    let len = word(4) as usize;
    if len > MAX_RECORD {
        return Err(false);
    }
    if buf.len() - p - REC_HEADER < len {
        return Err(true);
    }
    let payload = &buf[p + REC_HEADER..p + REC_HEADER + len];
    if crc32fast::hash(payload) != word(8) {
        return Err(false);
    }
    Ok(REC_HEADER + len)
}

/// Parses frames in `buf`, which holds the bytes starting at file offset `base`.
/// `at_eof`: `buf` ends at the end of the file, so a corrupt region with no
/// intact record after it is reported as corrupt, not incomplete, when
/// `tail_is_corrupt` is set (closed segments), and as incomplete otherwise.
pub fn scan(buf: &[u8], base: u64, max_records: usize, tail_is_corrupt: bool) -> Scan {
    let mut s = Scan::default();
    let mut p = 0usize;
    while p < buf.len() && s.records.len() < max_records {
        match frame_at(buf, p) {
            Ok(n) => {
                s.records
                    .push((base + (p + n) as u64, buf[p + REC_HEADER..p + n].to_vec()));
                p += n;
            }
            Err(true) if !tail_is_corrupt => break,
            Err(_) => {
                // Resynchronise on the next intact frame.
                let next = (p + 1..buf.len()).find(|&q| frame_at(buf, q).is_ok());
                match next {
                    Some(q) => {
                        s.corrupt.push((base + p as u64, base + q as u64));
                        p = q;
                    }
                    None if tail_is_corrupt => {
                        s.corrupt.push((base + p as u64, base + buf.len() as u64));
                        p = buf.len();
                    }
                    None => break,
                }
            }
        }
    }
    s.end = base + p as u64;
    s
}

/// Reads `[from, EOF)` of a segment.
pub fn read_from(path: &Path, from: u64) -> Result<Vec<u8>, SpoolError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic).map_err(io_err(path))?;
    if &magic != FILE_MAGIC {
        return Err(SpoolError::NotASegment {
            path: path.to_owned(),
        });
    }
    f.seek(SeekFrom::Start(from.max(HEADER_LEN)))
        .map_err(io_err(path))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(io_err(path))?;
    Ok(buf)
}

/// Appends batches of records to the newest segment.
pub struct SpoolWriter {
    dir: PathBuf,
    file: File,
    id: u64,
    len: u64,
    segment_bytes: u64,
}

impl SpoolWriter {
    /// Opens (creating) the spool; cuts a torn tail off the newest segment.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        std::fs::create_dir_all(dir.join("quarantine")).map_err(io_err(dir))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(dir))?;
        }
        let ids = list_segments(dir)?;
        if let Some(&id) = ids.last() {
            let path = segment_path(dir, id);
            let valid_end = match read_from(&path, HEADER_LEN) {
                Ok(buf) => {
                    let s = scan(&buf, HEADER_LEN, usize::MAX, false);
                    // Anything after the last intact record of the newest
                    // segment is a torn write: cut it off.
                    s.end
                }
                Err(SpoolError::NotASegment { .. }) => 0,
                Err(e) => return Err(e),
            };
            if valid_end >= HEADER_LEN {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                let len = file.metadata().map_err(io_err(&path))?.len();
                if len > valid_end {
                    tracing::warn!(segment = %path.display(), torn_bytes = len - valid_end,
                        "cutting off an incomplete record at the end of the spool (a crash during a write)");
                    file.set_len(valid_end).map_err(io_err(&path))?;
                    file.sync_all().map_err(io_err(&path))?;
                }
                if valid_end == HEADER_LEN {
                    // Empty: keep appending to it.
                    let mut w = Self {
                        dir: dir.to_owned(),
                        file,
                        id,
                        len: valid_end,
                        segment_bytes,
                    };
                    w.file.seek(SeekFrom::End(0)).map_err(io_err(&path))?;
                    return Ok(w);
                }
                // Each run writes to a segment of its own; the previous run's
                // segments are closed and only read from now on.
                return Self::create(dir, id + 1, segment_bytes);
            }
            // An unreadable header: keep it aside and start a new segment.
            let q = dir.join("quarantine").join(format!("seg-{id:016}.lgs"));
            tracing::error!(segment = %path.display(), moved_to = %q.display(), "spool segment has no valid header; quarantined");
            std::fs::rename(&path, &q).map_err(io_err(&path))?;
            return Self::create(dir, id + 1, segment_bytes);
        }
        Self::create(dir, 1, segment_bytes)
    }

    fn create(dir: &Path, id: u64, segment_bytes: u64) -> Result<Self, SpoolError> {
        let path = segment_path(dir, id);
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(FILE_MAGIC).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        // The new name must survive a crash too.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(Self {
            dir: dir.to_owned(),
            file,
            id,
            len: HEADER_LEN,
            segment_bytes,
        })
    }

    /// Appends already-framed bytes (one or more records) and fsyncs.
    pub fn append(&mut self, framed: &[u8]) -> Result<(), SpoolError> {
        if self.len > HEADER_LEN && self.len + framed.len() as u64 > self.segment_bytes {
            *self = Self::create(&self.dir, self.id + 1, self.segment_bytes)?;
        }
        let path = segment_path(&self.dir, self.id);
        if let Err(e) = self
            .file
            .write_all(framed)
            .and_then(|_| self.file.sync_data())
        {
            // Never leave a partial frame behind later records (ENOSPC, EIO):
            // cut back to the last complete batch.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::End(0));
            return Err(io_err(&path)(e));
        }
        self.len += framed.len() as u64;
        Ok(())
    }

    pub fn segment(&self) -> u64 {
        self.id
    }
}

/// Position of the first record not yet shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub segment: u64,
    pub offset: u64,
}

pub fn load_cursor(dir: &Path) -> Option<Cursor> {
    let s = std::fs::read_to_string(dir.join("cursor")).ok()?;
    let mut it = s.split_whitespace();
    Some(Cursor {
        segment: it.next()?.parse().ok()?,
        offset: it.next()?.parse().ok()?,
    })
}

pub fn store_cursor(dir: &Path, c: Cursor) -> Result<(), SpoolError> {
    let tmp = dir.join("cursor.tmp");
    std::fs::write(&tmp, format!("{} {}\n", c.segment, c.offset)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, dir.join("cursor")).map_err(io_err(dir))
}

/// Deletes closed segments (not the newest) last written more than `max_age`
/// ago: retention of the local store when no ClickHouse is configured.
pub fn expire(dir: &Path, max_age: std::time::Duration) -> Result<usize, SpoolError> {
    let ids = list_segments(dir)?;
    let mut removed = 0;
    for &id in ids.iter().rev().skip(1) {
        let path = segment_path(dir, id);
        let old = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > max_age);
        if old {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Bytes in segments at or after the cursor (what is not yet shipped).
pub fn pending_bytes(dir: &Path, cursor: Option<Cursor>) -> u64 {
    let Ok(ids) = list_segments(dir) else {
        return 0;
    };
    ids.iter()
        .filter_map(|&id| {
            let len = std::fs::metadata(segment_path(dir, id)).ok()?.len();
            let from = match cursor {
                Some(c) if c.segment == id => c.offset.max(HEADER_LEN),
                Some(c) if c.segment > id => return None,
                _ => HEADER_LEN,
            };
            Some(len.saturating_sub(from))
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in payloads {
            frame(p, &mut v);
        }
        v
    }

    #[test]
    fn append_read_and_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::open(d.path(), SEGMENT_BYTES).unwrap();
        w.append(&framed(&[b"one", b"two"])).unwrap();
        let path = segment_path(d.path(), 1);
        // A crash in the middle of the next write.
        let mut torn = framed(&[b"three"]);
        torn.truncate(7);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&torn)
            .unwrap();
        let buf = read_from(&path, HEADER_LEN).unwrap();
        let s = scan(&buf, HEADER_LEN, usize::MAX, false);
        assert_eq!(s.records.len(), 2);
        assert!(s.corrupt.is_empty(), "an incomplete tail is not corruption");
        drop(w);
        let mut w = SpoolWriter::open(d.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(w.segment(), 2, "a new run writes a new segment");
        w.append(&framed(&[b"four"])).unwrap();
        let buf = read_from(&path, HEADER_LEN).unwrap();
        let s = scan(&buf, HEADER_LEN, usize::MAX, true);
        let got: Vec<&[u8]> = s.records.iter().map(|r| r.1.as_slice()).collect();
        assert_eq!(got, vec![&b"one"[..], b"two"], "the torn tail was cut off");
        assert!(s.corrupt.is_empty());
    }

    #[test]
    fn corruption_is_skipped_and_neighbours_kept() {
        let d = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::open(d.path(), SEGMENT_BYTES).unwrap();
        w.append(&framed(&[b"alpha", b"bravo-bravo", b"charlie"]))
            .unwrap();
        let path = segment_path(d.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip a payload byte of the middle record.
        let mid = HEADER_LEN as usize + REC_HEADER + 5 + REC_HEADER + 3;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let buf = read_from(&path, HEADER_LEN).unwrap();
        let s = scan(&buf, HEADER_LEN, usize::MAX, true);
        let got: Vec<&[u8]> = s.records.iter().map(|r| r.1.as_slice()).collect();
        assert_eq!(got, vec![&b"alpha"[..], b"charlie"]);
        assert_eq!(s.corrupt.len(), 1);
    }

    #[test]
    fn expiry_keeps_the_newest_segment() {
        let d = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::open(d.path(), 64).unwrap();
        for _ in 0..4 {
            w.append(&framed(&[&[7u8; 30]])).unwrap();
        }
        let before = list_segments(d.path()).unwrap();
        assert!(before.len() >= 3);
        assert_eq!(
            expire(d.path(), std::time::Duration::from_secs(3600)).unwrap(),
            0
        );
        assert_eq!(
            expire(d.path(), std::time::Duration::ZERO).unwrap(),
            before.len() - 1
        );
        assert_eq!(
            list_segments(d.path()).unwrap(),
            vec![*before.last().unwrap()]
        );
    }

    #[test]
    fn segments_rotate_and_cursor_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::open(d.path(), 64).unwrap();
        for _ in 0..5 {
            w.append(&framed(&[&[7u8; 30]])).unwrap();
        }
        assert!(list_segments(d.path()).unwrap().len() >= 3);
        let c = Cursor {
            segment: 2,
            offset: 50,
        };
        store_cursor(d.path(), c).unwrap();
        assert_eq!(load_cursor(d.path()), Some(c));
        assert!(pending_bytes(d.path(), Some(c)) > 0);
    }
}
