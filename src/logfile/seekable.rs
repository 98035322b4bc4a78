//! The compressed form of a rotated log file: zstd's seekable format, written, validated, read
//! back by offset, and recovered after a crash.
//!
//! Owns the bytes of `<stream>.log.N.zst` (and of the staged `<stream>.log.c<START>.zst` and
//! the temporary `<stream>.log.c<START>.tmp` a compression goes through), the mapping from a
//! raw position in the rotated file to the one frame holding it, and the decision of what a
//! crash left behind (docs/design.md "Compressed backups"). It never decides *when* a file
//! is compressed or installed (`crate::compress` and the stream's actor do), never renames or
//! removes anything but these files, and never trusts a file on disk to be well formed:
//! parsing allocates at most what the file's own length allows, and a malformed file is an
//! error, never a panic.
//!
//! # Format (all integers little-endian)
//!
//! A file is a sequence of frames that plain `zstd -d` understands (it skips skippable
//! frames), so operators restore the raw bytes without conlog:
//!
//! 1. **Header**, a skippable frame: magic `0x184D2A5B`, frame size `64` (u32), then 64 bytes:
//!
//!    | off | size | field |
//!    | --- | --- | --- |
//!    | 0 | 8 | `CLOGZST1` |
//!    | 8 | 4 | `frame_size`: raw bytes per frame (every frame but the last holds exactly this) |
//!    | 12 | 4 | flags: bit 0 = the frames carry content checksums (always set); others 0 |
//!    | 16 | 8 | `raw_len`: bytes of the raw file |
//!    | 24 | 8 | `first_offset`: absolute offset of its first byte (informational) |
//!    | 32 | 8 | `source_inode`: inode of the raw file this replaces (crash recovery) |
//!    | 40 | 8 | `first_time_ns`, 48 | 8 | `last_time_ns`: UTC ns, 0 = unknown |
//!    | 56 | 4 | zstd level used |
//!    | 60 | 4 | CRC-32 of bytes 0..60 |
//!
//! 2. **Frames**: the raw file cut in `frame_size` pieces, each compressed on its own as one
//!    zstd frame carrying its content size and an XXH64 content checksum. Reading any offset
//!    decompresses at most the one frame holding it.
//!
//! 3. **Seek table**, per zstd's `contrib/seekable_format` (v0.1): skippable magic
//!    `0x184D2A5E`, its length, one entry `Compressed_Size u32, Decompressed_Size u32` per
//!    frame — the header frame included, as entry 0 with a decompressed size of 0 — then
//!    `Number_Of_Frames u32`, the descriptor byte `0x00` (no table checksums: the frames
//!    check themselves) and `0x8F92EAB1`.
//!
//! A file is valid when all of this holds exactly: magics, header CRC, known flags,
//! `frame_size` within [`MIN_FRAME_SIZE`]`..=`[`MAX_FRAME_SIZE`], the number of frames what
//! `raw_len` needs, every frame but the last exactly `frame_size` raw bytes, every compressed
//! size within zstd's bound, and the sizes summing to the file's length and to `raw_len`. A
//! frame that fails to decompress (checksum, corrupt data, wrong size) is reported with its
//! raw range, so a reader shows exactly those offsets as a gap and goes on.
//!
//! # Crashes
//!
//! A compression writes `.c<START>.tmp`, syncs it, renames it to `.c<START>.zst` (staged) and
//! syncs the directory; only then does the stream's actor rename the staged file to `.N.zst`
//! and unlink the raw `.N`. [`recover`] (run when a log is opened) applies [`decide`], whose
//! table makes exactly one copy of every rotated file count after a crash at any step.

use crate::fault;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;
use zstd::zstd_safe::CParameter;

/// Magic of the header's skippable frame.
const HEADER_MAGIC: u32 = 0x184D_2A5B;
/// Magic of the seek table's skippable frame (zstd's seekable format).
const SEEK_TABLE_MAGIC: u32 = 0x184D_2A5E;
/// Last four bytes of a seekable file.
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
const HEADER_ID: &[u8; 8] = b"CLOGZST1";
/// Payload bytes of the header frame.
const HEADER_PAYLOAD: u32 = 64;
/// The header frame on disk: magic, size, payload.
const HEADER_BYTES: usize = 72;
/// [`HEADER_BYTES`] as the seek table and file positions count.
const HEADER_FRAME_LEN: u32 = 72;
/// `Number_Of_Frames`, descriptor, magic.
const FOOTER_BYTES: usize = 9;
const FOOTER_LEN: u64 = 9;
/// Bit 0 of the header's flags: frames carry content checksums.
const FLAG_CHECKSUMS: u32 = 1;
/// Smallest frame accepted in a file (the config's floor is larger; small frames serve tests).
pub(crate) const MIN_FRAME_SIZE: u32 = 4 << 10;
/// Largest frame accepted: bounds what one read decompresses.
pub(crate) const MAX_FRAME_SIZE: u32 = 1 << 20;
/// The seek table format's own limit on frames.
const MAX_FRAMES: u64 = 1 << 27;
/// Disk room is asked for in steps of at most this many bytes while a file is written, and
/// of an eighth of the raw file at most, so a small budget is never over-asked.
pub(crate) const RESERVE_STEP: u64 = 256 << 10;

/// The reservation step for a raw file of `raw_len` bytes.
pub(crate) fn reserve_step(raw_len: u64) -> u64 {
    (raw_len / 8).clamp(4096, RESERVE_STEP)
}

/// What makes a file on disk not a valid compressed log file.
#[derive(Debug, Error)]
pub(crate) enum FormatError {
    #[error("cannot read the compressed file")]
    Io(#[from] io::Error),
    #[error("file too short ({0} bytes) for a compressed log file")]
    TooShort(u64),
    #[error("bad {0} magic")]
    Magic(&'static str),
    #[error("header checksum mismatch")]
    HeaderCrc,
    #[error("unknown header flags {0:#x}")]
    Flags(u32),
    #[error("frame size {0} outside {MIN_FRAME_SIZE}..={MAX_FRAME_SIZE}")]
    FrameSize(u32),
    #[error("seek table descriptor {0:#x} not supported")]
    Descriptor(u8),
    #[error("seek table: {0}")]
    Table(&'static str),
}

/// A frame that cannot be read back.
#[derive(Debug, Error)]
pub(crate) enum ReadError {
    #[error("cannot read the compressed file")]
    Io(#[from] io::Error),
    /// Frame `frame` (1-based, as `zstd -l` counts data frames) holding raw positions
    /// `from .. to` is corrupt: those bytes are lost, the rest of the file is readable.
    #[error("corrupted compressed frame {frame} (raw bytes {from}..{to}): {reason}")]
    Corrupt {
        frame: usize,
        from: u64,
        to: u64,
        reason: String,
    },
    /// A position at or past the raw length.
    #[error("position {0} is past the end of the compressed file")]
    Beyond(u64),
}

/// The header of a compressed log file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Header {
    pub frame_size: u32,
    pub raw_len: u64,
    pub first_offset: u64,
    pub source_inode: u64,
    pub first_time_ns: i64,
    pub last_time_ns: i64,
    pub level: i32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&(HEADER_PAYLOAD).to_le_bytes());
        let p = &mut out[8..];
        p[0..8].copy_from_slice(HEADER_ID);
        p[8..12].copy_from_slice(&self.frame_size.to_le_bytes());
        p[12..16].copy_from_slice(&FLAG_CHECKSUMS.to_le_bytes());
        p[16..24].copy_from_slice(&self.raw_len.to_le_bytes());
        p[24..32].copy_from_slice(&self.first_offset.to_le_bytes());
        p[32..40].copy_from_slice(&self.source_inode.to_le_bytes());
        p[40..48].copy_from_slice(&self.first_time_ns.to_le_bytes());
        p[48..56].copy_from_slice(&self.last_time_ns.to_le_bytes());
        p[56..60].copy_from_slice(&self.level.to_le_bytes());
        let crc = crc32fast::hash(&p[0..60]);
        p[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Self, FormatError> {
        if u32_at(bytes, 0) != HEADER_MAGIC || u32_at(bytes, 4) != HEADER_PAYLOAD {
            return Err(FormatError::Magic("header"));
        }
        let p = &bytes[8..];
        if &p[0..8] != HEADER_ID {
            return Err(FormatError::Magic("header"));
        }
        if crc32fast::hash(&p[0..60]) != u32_at(p, 60) {
            return Err(FormatError::HeaderCrc);
        }
        let flags = u32_at(p, 12);
        if flags != FLAG_CHECKSUMS {
            return Err(FormatError::Flags(flags));
        }
        let frame_size = u32_at(p, 8);
        if !(MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&frame_size) {
            return Err(FormatError::FrameSize(frame_size));
        }
        Ok(Self {
            frame_size,
            raw_len: u64_at(p, 16),
            first_offset: u64_at(p, 24),
            source_inode: u64_at(p, 32),
            first_time_ns: i64::from_le_bytes(p[40..48].try_into().expect("8 bytes")),
            last_time_ns: i64::from_le_bytes(p[48..56].try_into().expect("8 bytes")),
            level: i32::from_le_bytes(p[56..60].try_into().expect("4 bytes")),
        })
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads and checks only the header (one `pread`): enough to place the file's raw bytes.
pub(crate) fn read_header(file: &File) -> Result<Header, FormatError> {
    let mut bytes = [0u8; HEADER_BYTES];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => {
                FormatError::TooShort(file.metadata().map_or(0, |m| m.len()))
            }
            _ => FormatError::Io(e),
        })?;
    Header::decode(&bytes)
}

/// One data frame's place in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Frame {
    /// Where its compressed bytes start in the file.
    disk_pos: u64,
    disk_len: u32,
    raw_len: u32,
}

/// A validated compressed file's header and frames: 16 bytes per frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SeekTable {
    pub header: Header,
    frames: Vec<Frame>,
    /// The file's length when validated.
    pub disk_len: u64,
}

impl SeekTable {
    /// Validates `file` (module docs, "Format") and returns its table.
    pub(crate) fn read(file: &File) -> Result<Self, FormatError> {
        let disk_len = file.metadata()?.len();
        if disk_len < u64::from(HEADER_FRAME_LEN) + 8 + FOOTER_LEN + 8 {
            return Err(FormatError::TooShort(disk_len));
        }
        let header = read_header(file)?;
        let mut footer = [0u8; FOOTER_BYTES];
        file.read_exact_at(&mut footer, disk_len - FOOTER_LEN)?;
        if u32_at(&footer, 5) != SEEKABLE_MAGIC {
            return Err(FormatError::Magic("seekable"));
        }
        if footer[4] != 0 {
            return Err(FormatError::Descriptor(footer[4]));
        }
        let count = u64::from(u32_at(&footer, 0));
        let frame_size = u64::from(header.frame_size);
        let data_frames = header.raw_len.div_ceil(frame_size);
        if count != data_frames + 1 || count > MAX_FRAMES {
            return Err(FormatError::Table(
                "number of frames does not match the raw length",
            ));
        }
        let table_len = count * 8 + FOOTER_LEN;
        // The table and the header frame must fit: this bounds the allocation by the file.
        if table_len + 8 + u64::from(HEADER_FRAME_LEN) > disk_len {
            return Err(FormatError::Table("larger than the file"));
        }
        let table_pos = disk_len - table_len - 8;
        let mut table =
            vec![0u8; usize::try_from(table_len + 8).map_err(|_| FormatError::Table("too large"))?];
        file.read_exact_at(&mut table, table_pos)?;
        if u32_at(&table, 0) != SEEK_TABLE_MAGIC {
            return Err(FormatError::Magic("seek table"));
        }
        if u64::from(u32_at(&table, 4)) != table_len {
            return Err(FormatError::Table("length field does not match"));
        }
        let entry = |i: usize| (u32_at(&table, 8 + i * 8), u32_at(&table, 12 + i * 8));
        if entry(0) != (HEADER_FRAME_LEN, 0) {
            return Err(FormatError::Table("entry 0 is not the header frame"));
        }
        let bound = zstd::zstd_safe::compress_bound(header.frame_size as usize) as u64;
        let mut frames = Vec::with_capacity(usize::try_from(data_frames).unwrap_or(0));
        let (mut disk_pos, mut raw) = (u64::from(HEADER_FRAME_LEN), 0u64);
        for i in 1..usize::try_from(count).map_err(|_| FormatError::Table("too large"))? {
            let (disk, raw_len) = entry(i);
            let last = i as u64 == data_frames;
            let expected = if last {
                header.raw_len - raw
            } else {
                frame_size
            };
            if u64::from(raw_len) != expected {
                return Err(FormatError::Table(
                    "a frame's raw size is not the frame size",
                ));
            }
            if disk == 0 || u64::from(disk) > bound {
                return Err(FormatError::Table(
                    "a frame's compressed size is out of bounds",
                ));
            }
            frames.push(Frame {
                disk_pos,
                disk_len: disk,
                raw_len,
            });
            disk_pos += u64::from(disk);
            raw += u64::from(raw_len);
        }
        if disk_pos != table_pos {
            return Err(FormatError::Table(
                "frame sizes do not add up to the file's length",
            ));
        }
        Ok(Self {
            header,
            frames,
            disk_len,
        })
    }

    /// Raw bytes the file restores.
    pub(crate) fn raw_len(&self) -> u64 {
        self.header.raw_len
    }

    /// Data frames.
    #[cfg(test)]
    pub(crate) fn frames(&self) -> usize {
        self.frames.len()
    }
}

thread_local! {
    /// One decompression context and compressed-bytes buffer per thread (not per reader):
    /// reads run inline on the runtime's few threads.
    static READER: RefCell<Option<(zstd::bulk::Decompressor<'static>, Vec<u8>)>> = const { RefCell::new(None) };
}

/// Reads raw bytes from position `pos` of the file `table` describes: at most `len` bytes,
/// and never past the end of the frame holding `pos` (so a sequential reader's next read is
/// frame-aligned). Decompresses exactly one frame.
pub(crate) fn read_at(
    file: &File,
    table: &SeekTable,
    pos: u64,
    len: usize,
) -> Result<Vec<u8>, ReadError> {
    if pos >= table.raw_len() {
        return Err(ReadError::Beyond(pos));
    }
    let frame_size = u64::from(table.header.frame_size);
    let index = usize::try_from(pos / frame_size).map_err(|_| ReadError::Beyond(pos))?;
    let frame = table.frames[index];
    let from = index as u64 * frame_size;
    let corrupt = |reason: String| ReadError::Corrupt {
        frame: index + 1,
        from,
        to: from + u64::from(frame.raw_len),
        reason,
    };
    let raw = READER.with(|cell| -> Result<Vec<u8>, ReadError> {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some((zstd::bulk::Decompressor::new()?, Vec::new()));
        }
        let (dctx, compressed) = cell.as_mut().expect("set above");
        compressed.resize(frame.disk_len as usize, 0);
        file.read_exact_at(compressed, frame.disk_pos)
            .map_err(|e| match e.kind() {
                ErrorKind::UnexpectedEof => corrupt("the file is shorter than its table".into()),
                _ => ReadError::Io(e),
            })?;
        let mut raw = Vec::with_capacity(frame.raw_len as usize);
        let result = dctx.decompress_to_buffer(compressed.as_slice(), &mut raw);
        if compressed.capacity() > 2 * MAX_FRAME_SIZE as usize {
            *compressed = Vec::new();
        }
        match result {
            Ok(n) if n == frame.raw_len as usize => Ok(raw),
            Ok(n) => Err(corrupt(format!("{n} bytes instead of {}", frame.raw_len))),
            Err(e) => Err(corrupt(e.to_string())),
        }
    })?;
    let mut raw = raw;
    let skip = usize::try_from(pos - from).expect("within a frame");
    raw.truncate(skip.saturating_add(len));
    // Only the first read of a reader starts mid-frame.
    raw.drain(..skip);
    Ok(raw)
}

/// How files are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    pub level: i32,
    pub frame_size: u32,
}

/// What the writer asks of whoever runs it, between frames.
pub(crate) trait Control {
    /// Asks for `bytes` more disk room for the file being written; `false` when refused.
    fn reserve(&mut self, bytes: u64) -> bool;
    /// Whether to go on (false when the daemon pauses compression for an upgrade).
    fn keep_going(&self) -> bool;
}

/// How a [`stage`] ended. In every case but `Staged` no file of it is left.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Staged {
    /// `path` is complete, synced, and its directory entry durable: `disk_len` bytes.
    Done { path: PathBuf, disk_len: u64 },
    /// Compressing would not save a frame's worth (random data): the raw file stays.
    NotWorth,
    /// Disk room was refused.
    Refused,
    /// Stopped between frames (pause).
    Stopped,
}

/// `<log>.N.zst`.
pub(crate) fn zst_path(log: &Path, n: u32) -> PathBuf {
    suffixed(log, &format!(".{n}.zst"))
}

/// `<log>.c<START>.zst`: a staged file, named by the absolute offset of its first byte so the
/// name survives rotations that renumber the raw file.
pub(crate) fn staged_path(log: &Path, start: u64) -> PathBuf {
    suffixed(log, &format!(".c{start}.zst"))
}

/// `<log>.c<START>.tmp`: a file being written.
pub(crate) fn tmp_path(log: &Path, start: u64) -> PathBuf {
    suffixed(log, &format!(".c{start}.tmp"))
}

fn suffixed(log: &Path, suffix: &str) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Compresses `raw_len` bytes of `source` (a rotated file) into the staged file of `log` for
/// `header.first_offset`, through its temporary file. `header.raw_len`, `frame_size` and
/// `level` are set here. Fault point `compress.frame` after each frame, `compress.staged` once
/// the staged file is durable.
pub(crate) fn stage(
    source: &File,
    log: &Path,
    mut header: Header,
    settings: Settings,
    compressor: &mut zstd::bulk::Compressor<'_>,
    control: &mut dyn Control,
) -> io::Result<Staged> {
    let raw_len = source.metadata()?.len();
    header.raw_len = raw_len;
    header.frame_size = settings.frame_size;
    header.level = settings.level;
    let tmp = tmp_path(log, header.first_offset);
    let staged = staged_path(log, header.first_offset);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(rustix::fs::OFlags::CLOEXEC.bits().cast_signed())
        .open(&tmp)?;
    let result =
        write_frames(source, &mut out, header, settings, compressor, control).and_then(|wrote| {
            let Wrote::Done(disk_len) = wrote else {
                return Ok(wrote);
            };
            // Random data: a frame's overhead is all it would change (docs/design.md "Compressed backups").
            if disk_len >= raw_len - raw_len / 64 {
                return Ok(Wrote::NotWorth);
            }
            // The raw file's mtime is its newest byte's time: age retention reads it
            // (docs/operations.md, "Retention"), so the compressed file keeps it.
            out.set_modified(source.metadata()?.modified()?)?;
            out.sync_data()?;
            fs::rename(&tmp, &staged)?;
            super::files::sync_parent(&staged)?;
            Ok(wrote)
        });
    drop(out);
    match result {
        Ok(Wrote::Done(disk_len)) => {
            fault::point("compress.staged");
            Ok(Staged::Done {
                path: staged,
                disk_len,
            })
        }
        Ok(other) => {
            super::files::remove_if_exists(&tmp)?;
            Ok(match other {
                Wrote::NotWorth => Staged::NotWorth,
                Wrote::Refused => Staged::Refused,
                _ => Staged::Stopped,
            })
        }
        Err(e) => {
            let _ = super::files::remove_if_exists(&tmp);
            let _ = super::files::remove_if_exists(&staged);
            Err(e)
        }
    }
}

/// How [`write_frames`] ended.
enum Wrote {
    Done(u64),
    NotWorth,
    Refused,
    Stopped,
}

/// Writes header, frames and table.
fn write_frames(
    source: &File,
    out: &mut File,
    header: Header,
    settings: Settings,
    compressor: &mut zstd::bulk::Compressor<'_>,
    control: &mut dyn Control,
) -> io::Result<Wrote> {
    compressor.set_parameter(CParameter::CompressionLevel(settings.level))?;
    compressor.set_parameter(CParameter::ChecksumFlag(true))?;
    compressor.set_parameter(CParameter::ContentSizeFlag(true))?;
    let frame_size = settings.frame_size as usize;
    let mut reserved = 0u64;
    let step = reserve_step(header.raw_len);
    let mut written = 0u64;
    let mut room = |control: &mut dyn Control, written: u64, more: u64| -> bool {
        while written + more > reserved {
            if !control.reserve(step) {
                return false;
            }
            reserved += step;
        }
        true
    };
    if !room(control, 0, u64::from(HEADER_FRAME_LEN)) {
        return Ok(Wrote::Refused);
    }
    out.write_all(&header.encode())?;
    written += u64::from(HEADER_FRAME_LEN);
    let mut entries: Vec<(u32, u32)> = vec![(HEADER_FRAME_LEN, 0)];
    let mut raw = vec![0u8; frame_size];
    let mut compressed = vec![0u8; zstd::zstd_safe::compress_bound(frame_size)];
    let mut pos = 0u64;
    while pos < header.raw_len {
        let n =
            usize::try_from(header.raw_len - pos).map_or(frame_size, |left| left.min(frame_size));
        source.read_exact_at(&mut raw[..n], pos)?;
        let c = compressor.compress_to_buffer(&raw[..n], compressed.as_mut_slice())?;
        if !room(control, written, c as u64) {
            return Ok(Wrote::Refused);
        }
        out.write_all(&compressed[..c])?;
        written += c as u64;
        // Both at most compress_bound(MAX_FRAME_SIZE), far below 4 GiB.
        entries.push((
            u32::try_from(c).expect("bounded"),
            u32::try_from(n).expect("bounded"),
        ));
        pos += n as u64;
        fault::point("compress.frame");
        if !control.keep_going() {
            return Ok(Wrote::Stopped);
        }
    }
    let table = seek_table(&entries);
    if !room(control, written, table.len() as u64) {
        return Ok(Wrote::Refused);
    }
    out.write_all(&table)?;
    Ok(Wrote::Done(written + table.len() as u64))
}

fn seek_table(entries: &[(u32, u32)]) -> Vec<u8> {
    let mut t = Vec::with_capacity(8 + entries.len() * 8 + FOOTER_BYTES);
    t.extend_from_slice(&SEEK_TABLE_MAGIC.to_le_bytes());
    let len = entries.len() * 8 + FOOTER_BYTES;
    t.extend_from_slice(
        &u32::try_from(len)
            .expect("bounded by MAX_FRAMES")
            .to_le_bytes(),
    );
    for (disk, raw) in entries {
        t.extend_from_slice(&disk.to_le_bytes());
        t.extend_from_slice(&raw.to_le_bytes());
    }
    t.extend_from_slice(&u32::try_from(entries.len()).expect("bounded").to_le_bytes());
    t.push(0);
    t.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    t
}

// ---------------------------------------------------------------------------------------------
// Crash recovery.

/// The files of one stream that a compression may involve, as found at open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Found {
    /// Raw backups `.N` and their inodes.
    pub raw: BTreeMap<u32, u64>,
    /// Compressed backups `.N.zst`: the inode they replace, or `None` if invalid.
    pub zst: BTreeMap<u32, Option<u64>>,
    /// Staged `.c<START>.zst`: the inode they replace, or `None` if invalid.
    pub staged: BTreeMap<u64, Option<u64>>,
    /// Temporary `.c<START>.tmp`.
    pub tmp: Vec<u64>,
}

/// A file of one stream, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Name {
    Raw(u32),
    Zst(u32),
    Staged(u64),
    Tmp(u64),
}

impl Name {
    pub(crate) fn path(self, log: &Path) -> PathBuf {
        match self {
            Name::Raw(n) => super::backup_path(log, n),
            Name::Zst(n) => zst_path(log, n),
            Name::Staged(start) => staged_path(log, start),
            Name::Tmp(start) => tmp_path(log, start),
        }
    }
}

/// A step of recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Unlink(Name),
    Rename(Name, Name),
}

/// What to do with what a crash left (the table in docs/design.md "Compressed backups"), in order:
///
/// | found | meaning | action |
/// | --- | --- | --- |
/// | `.c<S>.tmp` | interrupted before staging | unlink |
/// | `.N.zst` valid, of the raw `.N` beside it | installed, the unlink lost | unlink `.N` |
/// | `.N.zst` invalid or of another file, raw `.N` beside it | not ours to trust | unlink `.N.zst` (the raw stays) |
/// | staged, of the raw `.N` (no `.N.zst`) | staged, not installed | rename to `.N.zst`, unlink `.N` |
/// | staged, of the raw `.N` that already has its `.N.zst` | installed twice | unlink staged |
/// | staged, no raw of its inode, exactly one hole in the chain (`.N` missing, `.N+1` present) | a power cut kept the unlink, lost the rename | rename to `.N.zst` |
/// | staged otherwise (raw removed for room, invalid) | nothing to install | unlink staged |
/// | `.N.zst` invalid, no raw | bit rot | keep: readers report it as a gap |
///
/// So after any crash exactly one copy of every rotated file counts.
pub(crate) fn decide(found: &Found) -> Vec<Action> {
    let mut actions: Vec<Action> = found
        .tmp
        .iter()
        .map(|&s| Action::Unlink(Name::Tmp(s)))
        .collect();
    // Numbers holding a file once the actions below are done.
    let mut present: BTreeMap<u32, Option<u64>> = BTreeMap::new();
    for (&n, &inode) in &found.raw {
        present.insert(n, Some(inode));
    }
    let mut installed: Vec<u32> = Vec::new();
    for (&n, &source) in &found.zst {
        match found.raw.get(&n) {
            Some(&inode) if source == Some(inode) => {
                actions.push(Action::Unlink(Name::Raw(n)));
                installed.push(n);
            }
            Some(_) => actions.push(Action::Unlink(Name::Zst(n))),
            None => {
                present.insert(n, None);
            }
        }
    }
    let mut orphans = Vec::new();
    for (&start, &source) in &found.staged {
        let Some(source) = source else {
            actions.push(Action::Unlink(Name::Staged(start)));
            continue;
        };
        match found.raw.iter().find(|(_, &inode)| inode == source) {
            Some((&n, _)) if installed.contains(&n) => {
                actions.push(Action::Unlink(Name::Staged(start)));
            }
            Some((&n, _)) => {
                actions.push(Action::Rename(Name::Staged(start), Name::Zst(n)));
                actions.push(Action::Unlink(Name::Raw(n)));
                installed.push(n);
            }
            None => orphans.push(start),
        }
    }
    // A hole: the lowest missing number below the highest present one.
    let highest = present.keys().next_back().copied().unwrap_or(0);
    let holes: Vec<u32> = (1..highest).filter(|n| !present.contains_key(n)).collect();
    let fill = (holes.len() == 1 && orphans.len() == 1).then(|| holes[0]);
    for start in orphans {
        match fill {
            Some(n) => actions.push(Action::Rename(Name::Staged(start), Name::Zst(n))),
            None => actions.push(Action::Unlink(Name::Staged(start))),
        }
    }
    actions
}

/// Finds the compression files of the stream whose current file is `log`.
pub(crate) fn scan(log: &Path) -> io::Result<Found> {
    let mut found = Found::default();
    let (Some(dir), Some(name)) = (log.parent(), log.file_name()) else {
        return Ok(found);
    };
    let mut prefix = name.to_owned();
    prefix.push(".");
    let prefix = prefix.as_encoded_bytes();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    let validity = |path: &Path| -> Option<u64> {
        let file = File::open(path).ok()?;
        SeekTable::read(&file).ok().map(|t| t.header.source_inode)
    };
    let mut zst_paths = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(rest) = file_name.as_encoded_bytes().strip_prefix(prefix) else {
            continue;
        };
        let Ok(rest) = std::str::from_utf8(rest) else {
            continue;
        };
        if let Some(n) = number(rest) {
            if let Ok(meta) = entry.metadata() {
                found.raw.insert(n, meta.ino());
            }
        } else if let Some(n) = rest.strip_suffix(".zst").and_then(number) {
            // Checked below, only where a raw file of that number is beside it.
            found.zst.insert(n, None);
            zst_paths.push((n, entry.path()));
        } else if let Some(start) = rest
            .strip_prefix('c')
            .and_then(|r| r.strip_suffix(".zst"))
            .and_then(offset)
        {
            found.staged.insert(start, validity(&entry.path()));
        } else if let Some(start) = rest
            .strip_prefix('c')
            .and_then(|r| r.strip_suffix(".tmp"))
            .and_then(offset)
        {
            found.tmp.push(start);
        }
    }
    // A `.N.zst` is read (its seek table checked, its source inode taken) only when the raw
    // `.N` is still there: only then does recovery need to know whether it replaces it.
    for (n, path) in zst_paths {
        if found.raw.contains_key(&n) {
            found.zst.insert(n, validity(&path));
        }
    }
    Ok(found)
}

/// A backup number as written by conlog (no sign, no leading zero).
fn number(s: &str) -> Option<u32> {
    (!s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn offset(s: &str) -> Option<u64> {
    ((s == "0" || !s.starts_with('0')) && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Puts what a crash left of compressions of the log `log` in order ([`decide`]); returns the
/// steps taken. Run before the log's backups are listed.
pub(crate) fn recover(log: &Path) -> io::Result<Vec<Action>> {
    let actions = decide(&scan(log)?);
    for action in &actions {
        match *action {
            Action::Unlink(name) => super::files::remove_if_exists(&name.path(log))?,
            Action::Rename(from, to) => fs::rename(from.path(log), to.path(log))?,
        }
        tracing::info!(log = %log.display(), ?action, "compression recovery");
    }
    if !actions.is_empty() {
        super::files::sync_parent(log)?;
    }
    Ok(actions)
}

#[cfg(test)]
#[path = "seekable_tests.rs"]
mod tests;
