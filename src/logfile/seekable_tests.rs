#![allow(
    clippy::cast_possible_truncation,
    reason = "test data of known, small sizes"
)]

use super::*;
use proptest::prelude::*;
use std::os::unix::fs::MetadataExt;

const FRAME: u32 = 4096;

struct Grant {
    granted: u64,
    limit: u64,
    frames_before_stop: Option<usize>,
    asked: std::cell::Cell<usize>,
}

impl Grant {
    fn all() -> Self {
        Self {
            granted: 0,
            limit: u64::MAX,
            frames_before_stop: None,
            asked: 0.into(),
        }
    }
}

impl Control for Grant {
    fn reserve(&mut self, bytes: u64) -> bool {
        if self.granted + bytes > self.limit {
            return false;
        }
        self.granted += bytes;
        true
    }
    fn keep_going(&self) -> bool {
        let asked = self.asked.get() + 1;
        self.asked.set(asked);
        self.frames_before_stop.is_none_or(|n| asked < n)
    }
}

/// Text that compresses (lines with varying numbers), `len` bytes.
fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!(
                "[{:>6}.{:06}] line {i} of the console, value {}\r\n",
                i / 7,
                i * 7919 % 1_000_000,
                i * i % 977
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn settings() -> Settings {
    Settings {
        level: 3,
        frame_size: FRAME,
    }
}

/// Writes `raw` as backup 1 of `dir/s.log` and compresses it; returns (log path, staged path).
fn staged(dir: &Path, raw: &[u8], start: u64) -> (PathBuf, PathBuf) {
    let log = dir.join("s.log");
    fs::write(backup_path(&log, 1), raw).unwrap();
    // Its newest byte an hour old.
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    File::options()
        .write(true)
        .open(backup_path(&log, 1))
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    let source = File::open(backup_path(&log, 1)).unwrap();
    let header = Header {
        first_offset: start,
        source_inode: source.metadata().unwrap().ino(),
        ..Header::default()
    };
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    match stage(&source, &log, header, settings(), &mut c, &mut Grant::all()).unwrap() {
        Staged::Done { path, disk_len } => {
            assert_eq!(fs::metadata(&path).unwrap().len(), disk_len);
            (log, path)
        }
        other => panic!("not staged: {other:?}"),
    }
}

fn backup_path(log: &Path, n: u32) -> PathBuf {
    super::super::backup_path(log, n)
}

fn read_all(file: &File, table: &SeekTable) -> Vec<u8> {
    let mut out = Vec::new();
    while (out.len() as u64) < table.raw_len() {
        let chunk = read_at(file, table, out.len() as u64, 1 << 20).unwrap();
        assert!(!chunk.is_empty());
        out.extend_from_slice(&chunk);
    }
    out
}

#[test]
fn round_trip_by_frame_and_by_any_position() {
    let dir = tempfile::tempdir().unwrap();
    let raw = text(10 * FRAME as usize + 123);
    let (log, path) = staged(dir.path(), &raw, 5000);
    let file = File::open(&path).unwrap();
    let table = SeekTable::read(&file).unwrap();
    // The raw file's mtime (its newest byte's time) carries over, for age retention.
    let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
    assert_eq!(mtime(&path), mtime(&backup_path(&log, 1)));
    assert_eq!(table.raw_len(), raw.len() as u64);
    assert_eq!(table.frames(), 11);
    assert_eq!(table.header.first_offset, 5000);
    assert!(table.disk_len < raw.len() as u64 / 2, "text compresses");
    assert_eq!(read_all(&file, &table), raw);
    // A read never crosses a frame: from mid-frame it returns the frame's tail.
    for pos in [0u64, 1, 4095, 4096, 4097, 40_000, raw.len() as u64 - 1] {
        let got = read_at(&file, &table, pos, 100_000).unwrap();
        let frame_end = (pos / u64::from(FRAME) + 1) * u64::from(FRAME);
        let end = frame_end.min(raw.len() as u64);
        assert_eq!(&got[..], &raw[pos as usize..end as usize], "at {pos}");
        let short = read_at(&file, &table, pos, 7).unwrap();
        assert_eq!(
            &short[..],
            &raw[pos as usize..(pos as usize + 7).min(end as usize)]
        );
    }
    assert!(matches!(
        read_at(&file, &table, raw.len() as u64, 1),
        Err(ReadError::Beyond(_))
    ));
}

/// What any zstd decoder (and so `zstd -d`) restores is the raw file: header and seek table
/// are skippable frames.
#[test]
fn plain_zstd_decoding_restores_the_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = text(3 * FRAME as usize + 10);
    let (_, path) = staged(dir.path(), &raw, 0);
    let decoded = zstd::stream::decode_all(File::open(&path).unwrap()).unwrap();
    assert_eq!(decoded, raw);
}

#[test]
fn random_bytes_are_not_worth_compressing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("s.log");
    fs::write(backup_path(&log, 1), random(5 * FRAME as usize, 7)).unwrap();
    let source = File::open(backup_path(&log, 1)).unwrap();
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    let outcome = stage(
        &source,
        &log,
        Header::default(),
        settings(),
        &mut c,
        &mut Grant::all(),
    )
    .unwrap();
    assert_eq!(outcome, Staged::NotWorth);
    assert_eq!(names(dir.path()), vec!["s.log.1"]);
}

#[test]
fn refused_room_and_stops_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("s.log");
    // Text of 100 frames: more than one reservation step once compressed.
    fs::write(backup_path(&log, 1), random(100 * FRAME as usize, 3)).unwrap();
    let source = File::open(backup_path(&log, 1)).unwrap();
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    let mut grant = Grant {
        limit: reserve_step(100 * u64::from(FRAME)),
        ..Grant::all()
    };
    let outcome = stage(
        &source,
        &log,
        Header::default(),
        settings(),
        &mut c,
        &mut grant,
    )
    .unwrap();
    assert_eq!(outcome, Staged::Refused);
    assert_eq!(names(dir.path()), vec!["s.log.1"]);
    let mut grant = Grant {
        frames_before_stop: Some(3),
        ..Grant::all()
    };
    let outcome = stage(
        &source,
        &log,
        Header::default(),
        settings(),
        &mut c,
        &mut grant,
    )
    .unwrap();
    assert_eq!(outcome, Staged::Stopped);
    assert_eq!(grant.asked.get(), 3, "stopped right after the third frame");
    assert_eq!(names(dir.path()), vec!["s.log.1"]);
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// A corrupted frame is reported with its raw range; every other frame still reads exactly.
#[test]
fn a_corrupted_frame_is_an_error_with_its_range_and_the_rest_reads() {
    let dir = tempfile::tempdir().unwrap();
    let raw = text(6 * FRAME as usize);
    let (_, path) = staged(dir.path(), &raw, 0);
    let table = SeekTable::read(&File::open(&path).unwrap()).unwrap();
    let third = table.frames[2];
    let mut bytes = fs::read(&path).unwrap();
    bytes[(third.disk_pos + u64::from(third.disk_len) / 2) as usize] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let file = File::open(&path).unwrap();
    let table = SeekTable::read(&file).unwrap();
    for frame in 0..6u64 {
        let pos = frame * u64::from(FRAME) + 10;
        match read_at(&file, &table, pos, usize::MAX) {
            Ok(got) => {
                assert_ne!(frame, 2);
                assert_eq!(
                    &got[..],
                    &raw[pos as usize..((frame + 1) * u64::from(FRAME)) as usize]
                );
            }
            Err(ReadError::Corrupt {
                frame: n,
                from,
                to,
                reason,
            }) => {
                assert_eq!((frame, n, from, to), (2, 3, 2 * 4096, 3 * 4096));
                assert!(!reason.is_empty());
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Every validation rule, each broken on its own.
#[test]
fn every_malformation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = text(3 * FRAME as usize + 100);
    let (_, path) = staged(dir.path(), &raw, 0);
    let good = fs::read(&path).unwrap();
    let check = |what: &str, bytes: &[u8]| {
        let p = dir.path().join("bad");
        fs::write(&p, bytes).unwrap();
        let result = SeekTable::read(&File::open(&p).unwrap());
        assert!(result.is_err(), "{what} accepted");
        result.unwrap_err().to_string()
    };
    let len = good.len();
    let set_u32 = |at: usize, v: u32| {
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    // Re-signs the header after a change to its payload.
    let resign = |mut b: Vec<u8>| {
        let crc = crc32fast::hash(&b[8..68]);
        b[68..72].copy_from_slice(&crc.to_le_bytes());
        b
    };
    check("too short", &good[..40]);
    check("empty", &[]);
    check("header magic", &set_u32(0, 0x184D_2A50));
    check("header crc", &{
        let mut b = good.clone();
        b[30] ^= 1;
        b
    });
    assert!(check("flags", &resign(set_u32(8 + 12, 3))).contains("flags"));
    assert!(check("frame size", &resign(set_u32(8 + 8, 100))).contains("frame size"));
    assert!(check("frame size too large", &resign(set_u32(8 + 8, 2 << 20))).contains("frame size"));
    // raw_len no longer matching the number of frames, then the last frame's size.
    check("raw_len", &resign(set_u32(8 + 16, 9 * FRAME)));
    check(
        "raw_len within the last frame",
        &resign(set_u32(8 + 16, 3 * FRAME + 99)),
    );
    check("seekable magic", &set_u32(len - 4, 0x8F92_EAB2));
    assert!(check("descriptor", &{
        let mut b = good.clone();
        b[len - 5] = 0x80;
        b
    })
    .contains("descriptor"));
    check("count", &set_u32(len - 9, 3));
    check("count huge", &set_u32(len - 9, u32::MAX));
    let table_start = len - (5 * 8 + 9) - 8;
    check("table magic", &set_u32(table_start, 0x184D_2A5F));
    check("table length", &set_u32(table_start + 4, 5 * 8 + 10));
    check("entry 0", &set_u32(table_start + 8, 71));
    check("a raw size", &set_u32(table_start + 8 + 8 + 4, FRAME - 1));
    check("a compressed size of 0", &set_u32(table_start + 8 + 8, 0));
    check(
        "a compressed size out of bounds",
        &set_u32(table_start + 8 + 8, 1 << 20),
    );
    check("a byte appended", &[&good[..], &[0]].concat());
    check("a byte missing", &[&good[..72], &good[73..]].concat());
    // And the good one passes.
    SeekTable::read(&File::open(&path).unwrap()).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    /// Whatever bytes a file holds, validation and reads never panic, and a read of a valid
    /// table returns the right length or a corrupt-frame error.
    #[test]
    fn damaged_files_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..6), cut in any::<prop::sample::Index>(), do_cut: bool) {
        let dir = tempfile::tempdir().unwrap();
        let raw = text(3 * FRAME as usize + 100);
        let (_, path) = staged(dir.path(), &raw, 0);
        let mut bytes = fs::read(&path).unwrap();
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        if do_cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        if let Ok(table) = SeekTable::read(&file) {
            for frame in 0..table.frames() as u64 {
                let pos = frame * u64::from(table.header.frame_size);
                match read_at(&file, &table, pos, usize::MAX) {
                    Ok(got) => prop_assert_eq!(got.len() as u32, table.frames[frame as usize].raw_len),
                    Err(ReadError::Corrupt { .. }) => {}
                    Err(e) => prop_assert!(false, "{}", e),
                }
            }
        }
    }
}

// ---- recovery

fn found() -> Found {
    Found::default()
}

#[test]
fn decide_follows_the_table() {
    use Action::*;
    use Name::*;
    // Nothing left behind: nothing to do.
    let mut f = found();
    f.raw.insert(1, 11);
    f.zst.insert(2, Some(12));
    assert_eq!(decide(&f), vec![]);
    // A temporary file: interrupted before staging.
    let mut f = found();
    f.raw.insert(1, 11);
    f.tmp.push(700);
    assert_eq!(decide(&f), vec![Unlink(Tmp(700))]);
    // Staged, not installed: install it now.
    let mut f = found();
    f.raw.insert(1, 11);
    f.raw.insert(2, 12);
    f.staged.insert(700, Some(12));
    assert_eq!(
        decide(&f),
        vec![Rename(Staged(700), Zst(2)), Unlink(Raw(2))]
    );
    // Installed, the raw file's unlink lost.
    let mut f = found();
    f.raw.insert(1, 11);
    f.zst.insert(1, Some(11));
    assert_eq!(decide(&f), vec![Unlink(Raw(1))]);
    // A compressed file beside a raw one it does not replace (or invalid): the raw one stays.
    let mut f = found();
    f.raw.insert(1, 11);
    f.zst.insert(1, Some(99));
    f.raw.insert(2, 12);
    f.zst.insert(2, None);
    assert_eq!(decide(&f), vec![Unlink(Zst(1)), Unlink(Zst(2))]);
    // Staged for a file already installed: a duplicate.
    let mut f = found();
    f.raw.insert(1, 11);
    f.zst.insert(1, Some(11));
    f.staged.insert(700, Some(11));
    assert_eq!(decide(&f), vec![Unlink(Raw(1)), Unlink(Staged(700))]);
    // Staged, its raw file gone and exactly that hole in the chain: the rename was lost.
    let mut f = found();
    f.raw.insert(1, 11);
    f.zst.insert(3, Some(13));
    f.staged.insert(700, Some(12));
    assert_eq!(decide(&f), vec![Rename(Staged(700), Zst(2))]);
    // Staged, its raw file removed for room (no hole): nothing to install.
    let mut f = found();
    f.raw.insert(1, 11);
    f.raw.insert(2, 12);
    f.staged.insert(700, Some(13));
    assert_eq!(decide(&f), vec![Unlink(Staged(700))]);
    // Two orphans for one hole: ambiguous, neither is installed.
    let mut f = found();
    f.raw.insert(1, 11);
    f.raw.insert(3, 13);
    f.staged.insert(700, Some(12));
    f.staged.insert(800, Some(14));
    assert_eq!(decide(&f), vec![Unlink(Staged(700)), Unlink(Staged(800))]);
    // An invalid staged file never replaces anything.
    let mut f = found();
    f.raw.insert(1, 11);
    f.staged.insert(700, None);
    assert_eq!(decide(&f), vec![Unlink(Staged(700))]);
    // Bit rot in an installed file: kept (readers report it).
    let mut f = found();
    f.zst.insert(1, None);
    assert_eq!(decide(&f), vec![]);
}

/// The table applied to files on disk, built by hand as each crash leaves them.
#[test]
fn recover_leaves_exactly_one_copy() {
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    // Staged, not installed.
    let dir = tempfile::tempdir().unwrap();
    let raw = text(2 * FRAME as usize);
    let (log, path) = staged(dir.path(), &raw, 4096);
    fs::write(tmp_path(&log, 9999), b"half a file").unwrap();
    fs::write(&log, b"current").unwrap();
    fs::write(dir.path().join("s.log.1.idx"), b"index").unwrap();
    assert_eq!(path, staged_path(&log, 4096));
    let actions = recover(&log).unwrap();
    assert_eq!(actions.len(), 3);
    assert_eq!(
        names(dir.path()),
        vec!["s.log", "s.log.1.idx", "s.log.1.zst"]
    );
    let file = File::open(zst_path(&log, 1)).unwrap();
    assert_eq!(read_all(&file, &SeekTable::read(&file).unwrap()), raw);
    // Nothing more to do the second time.
    assert!(recover(&log).unwrap().is_empty());

    // Installed, the unlink lost: the raw file goes.
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = staged(dir.path(), &raw, 0);
    let raw_inode = ino(&backup_path(&log, 1));
    fs::rename(&path, zst_path(&log, 1)).unwrap();
    assert_eq!(
        SeekTable::read(&File::open(zst_path(&log, 1)).unwrap())
            .unwrap()
            .header
            .source_inode,
        raw_inode
    );
    recover(&log).unwrap();
    assert_eq!(names(dir.path()), vec!["s.log.1.zst"]);

    // Removed for room: the staged file goes, the others stay.
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = staged(dir.path(), &raw, 0);
    fs::remove_file(backup_path(&log, 1)).unwrap();
    fs::write(&log, b"current").unwrap();
    recover(&log).unwrap();
    assert_eq!(names(dir.path()), vec!["s.log"]);

    // A corrupt .zst beside its raw file: the raw file is the truth.
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = staged(dir.path(), &raw, 0);
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    fs::write(zst_path(&log, 1), &bytes).unwrap();
    fs::remove_file(&path).unwrap();
    recover(&log).unwrap();
    assert_eq!(names(dir.path()), vec!["s.log.1"]);
    assert_eq!(fs::read(backup_path(&log, 1)).unwrap(), raw);
}

#[test]
fn names_are_parsed_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("s.log");
    for name in [
        "s.log.01",
        "s.log.1x",
        "s.log.c.tmp",
        "s.log.c01.zst",
        "s.log.-1",
        "t.log.1",
        "s.log.1.idx",
        "s.log.c5.tmp.log",
    ] {
        fs::write(dir.path().join(name), b"x").unwrap();
    }
    fs::write(dir.path().join("s.log.2"), b"x").unwrap();
    fs::write(dir.path().join("s.log.c0.tmp"), b"x").unwrap();
    fs::write(dir.path().join("s.log.c17.zst"), b"x").unwrap();
    let f = scan(&log).unwrap();
    assert_eq!(f.raw.keys().copied().collect::<Vec<_>>(), vec![2]);
    assert_eq!(f.tmp, vec![0]);
    assert_eq!(f.staged.into_iter().collect::<Vec<_>>(), vec![(17, None)]);
    assert!(f.zst.is_empty());
}
