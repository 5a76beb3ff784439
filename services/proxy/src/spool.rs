//! The disk spool: events that could not be published wait here, in order, until NATS is back.
//!
//! One append-only file of length-prefixed records plus a small file holding the read offset, so
//! a restart resumes where publishing stopped instead of re-sending (the `Nats-Msg-Id` would
//! deduplicate a re-send only within the stream's duplicate window). The size is bounded by
//! `proxy.spool_max_bytes`; the caller drops, counts and reports what does not fit. Only the
//! publisher task touches the spool, never a request.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::emitter::OutgoingEvent;

const DATA_FILE: &str = "events.spool";
const OFFSET_FILE: &str = "events.offset";
/// Held with an exclusive lock for as long as the spool is open: one worker per folder.
const LOCK_FILE: &str = "spool.lock";
/// Guards against reading garbage as a huge allocation after a torn write.
const MAX_RECORD_BYTES: u32 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full ({max_bytes} bytes)")]
    Full { max_bytes: u64 },
    #[error("spool {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("spool {path}: corrupt record at offset {offset}")]
    Corrupt { path: PathBuf, offset: u64 },
    #[error(
        "spool {path} is in use by another worker (its {LOCK_FILE} is locked); each worker needs a \
         proxy.spool_dir of its own"
    )]
    Locked { path: PathBuf },
}

/// The spool of one worker.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    file: File,
    /// Bytes written (the file's length).
    write_offset: u64,
    /// Bytes already published.
    read_offset: u64,
    max_bytes: u64,
    /// The exclusive lock on [`LOCK_FILE`]; released when the spool is dropped (or the process ends).
    _lock: File,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, resuming after what was already published. Fails
    /// with [`SpoolError::Locked`] while another worker (in any process) has the folder open: two
    /// writers would interleave records and publish each other's events.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let io = |source| SpoolError::Io { path: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE)).map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked { path: dir.to_owned() }),
            Err(std::fs::TryLockError::Error(error)) => return Err(io(error)),
        }
        let file = OpenOptions::new().create(true).read(true).append(true).open(dir.join(DATA_FILE)).map_err(io)?;
        let write_offset = file.metadata().map_err(io)?.len();
        let read_offset = std::fs::read(dir.join(OFFSET_FILE))
            .ok()
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
            .min(write_offset);
        let mut spool = Self { dir: dir.to_owned(), file, write_offset, read_offset, max_bytes, _lock: lock };
        if spool.is_empty() && write_offset > 0 {
            spool.reset()?;
        }
        Ok(spool)
    }

    fn io_error(&self, source: std::io::Error) -> SpoolError {
        SpoolError::Io { path: self.dir.clone(), source }
    }

    /// Events waiting, in bytes.
    pub fn pending_bytes(&self) -> u64 {
        self.write_offset - self.read_offset
    }

    pub fn is_empty(&self) -> bool {
        self.read_offset >= self.write_offset
    }

    /// Appends one event, or refuses it when the spool is full.
    pub fn append(&mut self, event: &OutgoingEvent) -> Result<(), SpoolError> {
        let mut record = Vec::with_capacity(event.payload.len() + event.subject.len() + 64);
        for field in [event.subject.as_bytes(), event.id.as_bytes(), event.event_type.as_bytes()] {
            record.extend_from_slice(&(field.len() as u32).to_le_bytes());
            record.extend_from_slice(field);
        }
        record.extend_from_slice(&event.version.to_le_bytes());
        record.extend_from_slice(&(event.payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&event.payload);
        let framed_len = record.len() as u64 + 4;
        if self.pending_bytes() + framed_len > self.max_bytes {
            return Err(SpoolError::Full { max_bytes: self.max_bytes });
        }
        let mut framed = Vec::with_capacity(record.len() + 4);
        framed.extend_from_slice(&(record.len() as u32).to_le_bytes());
        framed.extend_from_slice(&record);
        self.file.write_all(&framed).map_err(|error| self.io_error(error))?;
        self.write_offset += framed_len;
        Ok(())
    }

    /// Reads up to `max` events from the read offset; returns them with the offset after the last.
    pub fn peek(&mut self, max: usize) -> Result<(Vec<OutgoingEvent>, u64), SpoolError> {
        let mut reader = BufReader::new(self.file.try_clone().map_err(|error| self.io_error(error))?);
        reader.seek(SeekFrom::Start(self.read_offset)).map_err(|error| self.io_error(error))?;
        let mut offset = self.read_offset;
        let mut events = Vec::new();
        while events.len() < max && offset < self.write_offset {
            let corrupt = || SpoolError::Corrupt { path: self.dir.clone(), offset };
            let length = read_u32(&mut reader).map_err(|_| corrupt())?;
            if length > MAX_RECORD_BYTES {
                return Err(corrupt());
            }
            let mut record = vec![0u8; length as usize];
            reader.read_exact(&mut record).map_err(|_| corrupt())?;
            events.push(decode_record(&record).ok_or_else(corrupt)?);
            offset += u64::from(length) + 4;
        }
        Ok((events, offset))
    }

    /// Marks everything before `offset` as published; an emptied spool is truncated.
    pub fn commit(&mut self, offset: u64) -> Result<(), SpoolError> {
        self.read_offset = offset.min(self.write_offset);
        if self.is_empty() {
            return self.reset();
        }
        std::fs::write(self.dir.join(OFFSET_FILE), self.read_offset.to_le_bytes()).map_err(|error| self.io_error(error))
    }

    /// Skips a record that cannot be read, so one torn write cannot wedge the spool forever.
    pub fn skip_rest(&mut self) -> Result<(), SpoolError> {
        self.commit(self.write_offset)
    }

    fn reset(&mut self) -> Result<(), SpoolError> {
        self.file.set_len(0).map_err(|error| self.io_error(error))?;
        self.write_offset = 0;
        self.read_offset = 0;
        std::fs::write(self.dir.join(OFFSET_FILE), 0u64.to_le_bytes()).map_err(|error| self.io_error(error))
    }
}

fn read_u32(reader: &mut impl Read) -> std::io::Result<u32> {
    let mut bytes = [0u8; 4];
    reader.read_exact(&mut bytes)?;
    Ok(u32::from_le_bytes(bytes))
}

/// Reads a record's fields front to back.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if self.0.len() < count {
            return None;
        }
        let (head, tail) = self.0.split_at(count);
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let length = self.u32()? as usize;
        String::from_utf8(self.take(length)?.to_vec()).ok()
    }
}

fn decode_record(record: &[u8]) -> Option<OutgoingEvent> {
    let mut cursor = Cursor(record);
    let subject = cursor.string()?;
    let id = cursor.string()?;
    let event_type = cursor.string()?;
    let version = cursor.u32()?;
    let payload_length = cursor.u32()? as usize;
    let payload = Bytes::copy_from_slice(cursor.take(payload_length)?);
    Some(OutgoingEvent { subject, id, event_type: Cow::Owned(event_type), version, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(index: usize) -> OutgoingEvent {
        OutgoingEvent {
            subject: format!("t.ev.request.completed.v2.0.r{index}"),
            id: format!("id-{index}"),
            event_type: Cow::Borrowed("request.completed"),
            version: 2,
            payload: Bytes::from(vec![b'x'; 100 + index]),
        }
    }

    #[test]
    fn events_come_back_in_order_and_survive_a_reopen() -> Result<(), SpoolError> {
        let dir = std::env::temp_dir().join(format!("stone-spool-test-{}", uuid::Uuid::now_v7()));
        let mut spool = Spool::open(&dir, 1 << 20)?;
        for index in 0..10 {
            spool.append(&event(index))?;
        }
        let (first, offset) = spool.peek(4)?;
        assert_eq!(first.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["id-0", "id-1", "id-2", "id-3"]);
        spool.commit(offset)?;
        drop(spool);
        let mut reopened = Spool::open(&dir, 1 << 20)?;
        let (rest, end) = reopened.peek(100)?;
        assert_eq!(rest.len(), 6);
        assert_eq!(rest[0].id, "id-4");
        assert_eq!(rest[5].payload.len(), 109);
        reopened.commit(end)?;
        assert!(reopened.is_empty());
        assert_eq!(
            std::fs::metadata(dir.join(DATA_FILE)).map(|m| m.len()).ok(),
            Some(0),
            "an emptied spool is truncated"
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn a_second_open_of_the_same_folder_is_refused_until_the_first_is_dropped() -> Result<(), SpoolError> {
        let dir = std::env::temp_dir().join(format!("stone-spool-test-{}", uuid::Uuid::now_v7()));
        let first = Spool::open(&dir, 1 << 20)?;
        let second = Spool::open(&dir, 1 << 20);
        let message = second.as_ref().err().map(ToString::to_string).unwrap_or_default();
        assert!(matches!(second, Err(SpoolError::Locked { .. })), "{second:?}");
        assert!(message.contains(&dir.display().to_string()), "the error names the folder: {message}");
        drop(first);
        assert!(Spool::open(&dir, 1 << 20).is_ok(), "the lock goes with the spool");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn a_full_spool_refuses_events() -> Result<(), SpoolError> {
        let dir = std::env::temp_dir().join(format!("stone-spool-test-{}", uuid::Uuid::now_v7()));
        let mut spool = Spool::open(&dir, 500)?;
        let accepted = (0..10).filter(|index| spool.append(&event(*index)).is_ok()).count();
        assert!((1..10).contains(&accepted), "{accepted}");
        assert!(spool.pending_bytes() <= 500);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
