//! Tests of the log against a model and of its recovery from crashes and power cuts.

use super::gaps::Gap;
use super::*;
use std::fs;

fn limits(max_size: u64, max_backups: u32, mode: LogMode) -> LogLimits {
    LogLimits {
        max_size,
        max_backups,
        mode,
        compress: crate::logfile::Compression::None,
        max_age: 0,
    }
}

/// Sets a file's mtime to `age` ago.
fn age_file(path: &Path, age: std::time::Duration) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - age)
        .unwrap();
}

#[test]
fn expiry_deletes_the_old_rotated_files_with_their_indexes_and_never_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pos) = (dir.path().join("s.log"), dir.path().join("s.pos"));
    let mut log = LogFile::open(&path, &pos, limits(4096, 5, LogMode::Rotate)).unwrap();
    log.append(&[b'x'; 4096 * 4 + 100]).unwrap();
    // Files: .4 (0..4096), .3, .2, .1 (12288..16384), current (16384..16484).
    let hour = std::time::Duration::from_secs(3600);
    age_file(&path, 10 * hour);
    age_file(&backup_path(&path, 1), hour / 2);
    age_file(&backup_path(&path, 2), 2 * hour);
    // Younger than .2 by mtime but older by its data: it goes with every older file.
    age_file(&backup_path(&path, 3), hour / 4);
    age_file(&backup_path(&path, 4), 3 * hour);
    let now = std::time::SystemTime::now();
    // Off: nothing goes.
    assert_eq!(log.expire(now).unwrap(), 0);
    // Index files beside the backups (empty: a full file and its index together stay within
    // max_size).
    for n in 1..=4 {
        fs::write(index::index_path(&backup_path(&path, n)), b"").unwrap();
    }
    // New limits with an age hold when they are set.
    log.set_limits(LogLimits {
        max_age: 3600,
        ..limits(4096, 5, LogMode::Rotate)
    })
    .unwrap();
    assert_eq!(
        log.expire(now).unwrap(),
        0,
        "expired when the limits were set"
    );
    assert!(path.exists(), "the current file is never expired");
    assert!(backup_path(&path, 1).exists());
    assert!(index::index_path(&backup_path(&path, 1)).exists());
    for n in 2..=4 {
        assert!(!backup_path(&path, n).exists());
        assert!(!index::index_path(&backup_path(&path, n)).exists());
    }
    // The offsets stay: the oldest byte on disk is .1's first, history's leading gap before.
    assert_eq!(log.disk_usage(), (4096 + 100, 3 * 4096));
    assert_eq!(log.end_offset(), 4 * 4096 + 100);
    drop(log);
    let log = LogFile::open(&path, &pos, limits(4096, 5, LogMode::Rotate)).unwrap();
    assert_eq!(log.disk_usage(), (4096 + 100, 3 * 4096));
    assert_eq!(log.end_offset(), 4 * 4096 + 100);
}

/// Everything still on disk, oldest first, with the offset of its first byte.
fn on_disk(log: &LogFile) -> (u64, Vec<u8>) {
    let mut data = Vec::new();
    for (path, _) in backups_of(log.path(), log.limits().backups_kept())
        .iter()
        .rev()
    {
        data.extend(fs::read(path).unwrap());
    }
    data.extend(fs::read(log.path()).unwrap());
    (log.end_offset() - data.len() as u64, data)
}

/// A tiny deterministic generator, so the model test needs no extra crate.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn model_random_writes_match_plain_log() {
    for (mode, backups) in [
        (LogMode::Rotate, 3),
        (LogMode::Rotate, 0),
        (LogMode::Truncate, 5),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g/s.log");
        let pos = dir.path().join("state/s.pos");
        let lim = limits(4096, backups, mode);
        let mut log = LogFile::open(&path, &pos, lim).unwrap();
        let mut model: Vec<u8> = Vec::new();
        let mut rng = Lcg(7);
        for round in 0..400 {
            let len = (rng.next() % 3000) as usize;
            let chunk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            log.append(&chunk).unwrap();
            model.extend(&chunk);
            if round % 97 == 0 {
                // Reopen as after a restart: offsets continue.
                drop(log);
                log = LogFile::open(&path, &pos, lim).unwrap();
            }
            assert_eq!(log.end_offset(), model.len() as u64);
            let (first, data) = on_disk(&log);
            assert!(data.len() as u64 <= lim.disk_cap(), "cap exceeded");
            assert_eq!(
                &model[first as usize..],
                &data[..],
                "disk differs from model"
            );
            assert_eq!(log.disk_usage(), (data.len() as u64, first));
        }
    }
}

#[test]
fn crash_during_rotation_keeps_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("s.pos");
    let lim = limits(4096, 2, LogMode::Rotate);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    log.append(&[b'a'; 4096]).unwrap();
    // Simulate a crash right after the rename: record says "rotation to 4096 under way",
    // the current file is gone.
    log.save_position(Some(4096)).unwrap();
    fs::rename(&path, backup_path(&path, 1)).unwrap();
    std::mem::forget(log);
    let log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!(log.end_offset(), 4096);
    assert_eq!(log.current_start(), 4096);
}

#[test]
fn shrinking_limits_enforce_the_new_cap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let mut log = LogFile::open(
        &path,
        &dir.path().join("p"),
        limits(4096, 5, LogMode::Rotate),
    )
    .unwrap();
    log.append(&vec![1u8; 4096 * 6]).unwrap();
    assert_eq!(backups_of(&path, 10).len(), 5);
    log.set_limits(limits(4096, 1, LogMode::Rotate)).unwrap();
    assert_eq!(backups_of(&path, 10).len(), 1);
    assert_eq!(log.end_offset(), 4096 * 6);
}

#[test]
fn position_record_is_written_only_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g/s.log");
    let pos = dir.path().join("state/g/s.pos");
    let lim = limits(4096, 1, LogMode::Rotate);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    log.append(b"hello").unwrap();
    drop(log);
    let written = fs::read(&pos).unwrap();
    assert_eq!(written.len(), POSITION_RECORD_LEN);
    // Mark the record: a later save that rewrote it would change the modification time.
    let long_ago = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
    let mark = |t| {
        File::options()
            .write(true)
            .open(&pos)
            .unwrap()
            .set_modified(t)
            .unwrap()
    };
    let modified = || fs::metadata(&pos).unwrap().modified().unwrap();
    mark(long_ago);
    // A restart and a stop with nothing logged in between write nothing.
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    log.checkpoint().unwrap();
    drop(log);
    assert_eq!(modified(), long_ago);
    assert_eq!(fs::read(&pos).unwrap(), written);
    // New bytes change the end: the next checkpoint records them, and offsets continue.
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    log.append(b" world").unwrap();
    log.checkpoint().unwrap();
    assert_ne!(modified(), long_ago);
    drop(log);
    let log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!(log.end_offset(), 11);
}

/// Writes a record by hand, as a crash at some step would have left it.
fn write_record(pos: &Path, record: &Position) {
    let file = record::open(pos).unwrap();
    record::write(&file, record, POSITION_RECORD_LEN).unwrap();
}

#[test]
fn an_empty_file_with_the_unlinked_inode_is_the_new_one() {
    // Truncate mode, crash after the unlink: the new file got the old file's inode (ext4
    // does that), the record still names it with the rotation under way.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("s.pos");
    let lim = limits(4096, 0, LogMode::Truncate);
    let log = LogFile::open(&path, &pos, lim).unwrap();
    std::mem::forget(log);
    let inode = fs::metadata(&path).unwrap().ino();
    write_record(
        &pos,
        &Position {
            inode,
            start: 0,
            next_start: Some(4096),
            end: 4096,
            ..Position::default()
        },
    );
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!(log.end_offset(), 4096, "offsets never go back");
    log.append(b"after").unwrap();
    drop(log);
    let log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!(log.end_offset(), 4101);
    assert_eq!(log.segments()[0].start, 4096);
}

#[test]
fn a_file_shorter_than_its_record_leaves_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("s.pos");
    let lim = limits(1 << 20, 1, LogMode::Rotate);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    log.append(&[b'x'; 5000]).unwrap();
    drop(log);
    // A power cut: the record reached the disk, the last 2000 bytes did not.
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(3000)
        .unwrap();
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!(log.end_offset(), 5000, "offsets never go back");
    log.append(b"new").unwrap();
    let segments = log.segments();
    let runs: Vec<(u64, u64, u64)> = segments
        .iter()
        .map(|s| (s.start, s.len, s.file_pos))
        .collect();
    assert_eq!(runs, vec![(0, 3000, 0), (5000, 3, 3000)]);
    assert!(segments[1].growable && !segments[0].growable);
    drop(log);
    let log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!(log.end_offset(), 5003);
}

#[test]
fn dropped_bytes_take_offsets_and_are_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("s.pos");
    let lim = limits(100, 2, LogMode::Rotate);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    log.append(&[b'a'; 60]).unwrap();
    log.skip(30);
    log.append(&[b'b'; 60]).unwrap(); // 40 fill the file, 20 go to the next
    log.skip(5);
    std::mem::forget(log); // a crash: nothing saved at a close
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!(log.end_offset(), 155);
    assert_eq!(log.dropped(), 35);
    log.append(b"cc").unwrap();
    let runs: Vec<(u64, u64, u64)> = log
        .segments()
        .iter()
        .map(|s| (s.start, s.len, s.file_pos))
        .collect();
    assert_eq!(
        runs,
        vec![(0, 60, 0), (90, 40, 60), (130, 20, 0), (155, 2, 20)]
    );
    // Every run reads back what was written at its offsets.
    let segments = log.segments();
    let read = |s: &Segment| {
        let all = fs::read(&s.path).unwrap();
        all[s.file_pos as usize..(s.file_pos + s.len) as usize].to_vec()
    };
    assert_eq!(read(&segments[1]), vec![b'b'; 40]);
    assert_eq!(read(&segments[3]), b"cc");
}

#[test]
fn too_many_gaps_shed_the_oldest_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("s.pos");
    let lim = limits(1000, 3, LogMode::Rotate);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    for _ in 0..200 {
        log.append(&[b'z'; 10]).unwrap();
        log.skip(1);
        assert!(log.gaps.len() <= MAX_GAPS);
    }
    assert_eq!(log.end_offset(), 2200);
    assert!(fs::metadata(&pos).unwrap().len() <= 4096);
    drop(log);
    let log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!(log.end_offset(), 2200);
    assert_eq!(log.dropped(), 200);
}

#[test]
fn oversized_backups_go_when_max_size_shrinks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("p");
    let mut log = LogFile::open(&path, &pos, limits(1 << 16, 4, LogMode::Rotate)).unwrap();
    log.append(&vec![1u8; (1 << 16) * 4 + 100]).unwrap();
    log.set_limits(limits(4096, 4, LogMode::Rotate)).unwrap();
    let (bytes, first) = log.disk_usage();
    assert!(bytes <= 4096 * 5, "{bytes} bytes on disk");
    assert_eq!(log.end_offset(), (1 << 16) * 4 + 100);
    assert!(first >= log.end_offset() - bytes);
    log.append(&[2u8; 10_000]).unwrap();
    assert!(log.disk_usage().0 <= 4096 * 5);
}

#[test]
fn after_a_machine_restart_offsets_go_on_from_the_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("s.pos");
    let lim = limits(1 << 20, 1, LogMode::Rotate);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    log.append(&[b'a'; 3000]).unwrap();
    drop(log);
    let file = record::open(&pos).unwrap();
    let (record, _) = record::read(&file, &pos).unwrap();
    let mut record = record.unwrap();
    assert!(record.reserved >= 1 << 20, "{record:?}");
    // The same boot: a crash of the daemon, the page cache kept everything.
    let log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!(log.end_offset(), 3000);
    std::mem::forget(log);
    // Another boot: bytes handed out after the last save may be lost.
    record.boot = "another boot".into();
    write_record(&pos, &record);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!(log.end_offset(), record.reserved);
    log.append(b"b").unwrap();
    let runs: Vec<(u64, u64)> = log.segments().iter().map(|s| (s.start, s.len)).collect();
    assert_eq!(runs, vec![(0, 3000), (record.reserved, 1)]);
}

/// The position record as it is on disk now.
fn record_on_disk(pos: &Path) -> Position {
    let file = record::open(pos).unwrap();
    record::read(&file, pos).unwrap().0.expect("a record")
}

/// Start, length, position in the file and growth of each segment.
fn runs(log: &LogFile) -> Vec<(u64, u64, u64, bool)> {
    log.segments()
        .iter()
        .map(|s| (s.start, s.len, s.file_pos, s.growable))
        .collect()
}

#[test]
fn whether_a_writer_fed_the_stream_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("s.pos");
    let lim = limits(100, 1, LogMode::Rotate);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    assert!(!log.was_open());
    log.set_open(true).unwrap();
    assert!(
        record_on_disk(&pos).open,
        "recorded at once, before a crash"
    );
    std::mem::forget(log);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    assert!(log.was_open());
    log.set_open(false).unwrap();
    assert!(!record_on_disk(&pos).open);
    drop(log);
    let log = LogFile::open(&path, &pos, lim).unwrap();
    assert!(!log.was_open());
}

#[test]
fn a_full_file_rotates_before_the_read_that_needs_it() {
    use std::io::Read;
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("s.pos");
    let mut log = LogFile::open(&path, &pos, limits(100, 2, LogMode::Rotate)).unwrap();
    let (mut reader, mut writer) = std::io::pipe().unwrap();
    let mut buffer = [0u8; 4096];
    log.append(&[b'a'; 60]).unwrap();
    assert_eq!(log.room(), 40);
    // Room left: nothing rotates, bytes waiting or not.
    log.rotate_if_full(reader.as_fd());
    writer.write_all(b"x").unwrap();
    log.rotate_if_full(reader.as_fd());
    assert_eq!((log.rotations(), log.current_start()), (0, 0));
    // Full: the next append would rotate first.
    log.append(&[b'b'; 40]).unwrap();
    assert_eq!(log.room(), usize::MAX);
    assert_eq!(log.rotations(), 0, "a full file waits for data");
    // Full, nothing waiting: still no rotation.
    reader.read_exact(&mut buffer[..1]).unwrap();
    log.rotate_if_full(reader.as_fd());
    assert_eq!((log.rotations(), log.current_start()), (0, 0));
    assert_eq!(fs::metadata(&path).unwrap().len(), 100);
    // Full with bytes waiting: rotated now, before they are read.
    writer.write_all(&[b'c'; 150]).unwrap();
    log.rotate_if_full(reader.as_fd());
    assert_eq!((log.rotations(), log.current_start()), (1, 100));
    assert_eq!(backups_of(&path, 10), vec![(backup_path(&path, 1), 100)]);
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    assert_eq!(log.room(), 100);
    let record = record_on_disk(&pos);
    assert_eq!(
        (record.inode, record.start, record.next_start, record.end),
        (fs::metadata(&path).unwrap().ino(), 100, None, 100)
    );
    assert_eq!(record.reserved, 200, "the new file's offsets are reserved");
    // Reads are cut at the room left; the next one rotates first.
    let bytes = |logged| Moved::Bytes { logged, dropped: 0 };
    let mut moved = || {
        log.move_from_pipe(reader.as_fd(), 1000, &mut buffer)
            .unwrap()
    };
    assert_eq!(moved(), bytes(100));
    assert_eq!(moved(), bytes(50));
    drop(writer);
    assert_eq!(moved(), Moved::Eof);
    assert_eq!((log.rotations(), log.end_offset()), (2, 250));
    let mut expected = vec![b'a'; 60];
    expected.extend([b'b'; 40]);
    expected.extend([b'c'; 150]);
    assert_eq!(on_disk(&log), (0, expected));
}

#[test]
fn refused_bytes_become_a_gap_and_a_recreated_file_follows_them() {
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("g");
    let path = guest.join("s.log");
    let pos = dir.path().join("state/s.pos");
    let mut log = LogFile::open(&path, &pos, limits(10, 1, LogMode::Rotate)).unwrap();
    let written = |logged, dropped| Written { logged, dropped };
    assert_eq!(log.log(b"0123456789"), written(10, 0));
    // The guest's directory vanishes: the rotation cannot create the new file.
    fs::remove_dir_all(&guest).unwrap();
    assert_eq!(log.log(b"abc"), written(0, 3));
    assert_eq!((log.end_offset(), log.dropped()), (13, 3));
    let record = record_on_disk(&pos);
    assert_eq!(
        (record.inode, record.start, record.end, record.dropped),
        (0, 10, 13, 3),
        "no file, and the refused offsets taken"
    );
    assert_eq!(
        record.gaps.iter().copied().collect::<Vec<_>>(),
        vec![Gap(10, 13)]
    );
    // Someone recreates the file with bytes in it: they follow every offset handed out.
    fs::create_dir(&guest).unwrap();
    fs::write(&path, b"behind!").unwrap();
    assert_eq!(log.log(b"z"), written(1, 0));
    assert_eq!((log.current_start(), log.end_offset()), (13, 21));
    assert_eq!(fs::read(&path).unwrap(), b"behind!z");
    assert_eq!(runs(&log), vec![(13, 8, 0, true)]);
    drop(log);
    let log = LogFile::open(&path, &pos, limits(10, 1, LogMode::Rotate)).unwrap();
    assert_eq!((log.end_offset(), log.dropped()), (21, 3));
}

#[test]
fn offsets_are_reserved_on_disk_before_they_are_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("s.pos");
    let mut log = LogFile::open(&path, &pos, limits(100, 1, LogMode::Rotate)).unwrap();
    log.append(&[b'a'; 60]).unwrap();
    // A file's worth reserved before the first byte; the end is saved later.
    let record = record_on_disk(&pos);
    assert_eq!((record.end, record.reserved), (0, 100));
    // A gap longer than a file reserves up to its end.
    log.skip(500);
    let record = record_on_disk(&pos);
    assert_eq!(
        (record.end, record.dropped, record.reserved),
        (560, 500, 560)
    );
    assert_eq!(
        record.gaps.iter().copied().collect::<Vec<_>>(),
        vec![Gap(60, 560)]
    );
    assert_eq!(record.boot, record::boot_id());
}

#[test]
fn an_oversized_current_file_goes_when_max_size_shrinks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let mut log = LogFile::open(
        &path,
        &dir.path().join("p"),
        limits(1000, 2, LogMode::Rotate),
    )
    .unwrap();
    log.append(&[b'a'; 600]).unwrap();
    log.set_limits(limits(500, 2, LogMode::Rotate)).unwrap();
    // Rotated to `.1`, which is over the new size too: gone.
    assert_eq!(backups_of(&path, 10), vec![]);
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    assert_eq!(
        (log.rotations(), log.current_start(), log.end_offset()),
        (1, 600, 600)
    );
    assert_eq!(log.disk_usage(), (0, 600));
}

#[test]
fn a_full_file_is_not_emptied_before_data_comes() {
    // Truncate mode: rotating a full file at a restart or a limits change would empty what
    // readers still want.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("p");
    let lim = limits(100, 3, LogMode::Truncate);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    log.append(&[b'a'; 100]).unwrap();
    log.set_limits(lim).unwrap();
    assert_eq!((log.rotations(), log.disk_usage()), (0, (100, 0)));
    drop(log);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!((log.current_start(), log.disk_usage()), (0, (100, 0)));
    log.append(b"b").unwrap();
    assert_eq!((log.rotations(), log.disk_usage()), (1, (1, 100)));
    assert_eq!(fs::read(&path).unwrap(), b"b");
}

/// Appends `n` rounds of 5 bytes and a 1-byte gap.
fn bytes_and_gaps(log: &mut LogFile, n: usize) {
    for _ in 0..n {
        log.append(&[b'g'; 5]).unwrap();
        log.skip(1);
    }
}

#[test]
fn shedding_gaps_removes_only_the_oldest_files_it_needs_to() {
    let dir = tempfile::tempdir().unwrap();
    let lim = limits(100, 3, LogMode::Rotate);
    // The oldest file holds one gap, the current one the 16 others: the oldest goes.
    let path = dir.path().join("one.log");
    let mut log = LogFile::open(&path, &dir.path().join("one.pos"), lim).unwrap();
    log.append(&[b'a'; 10]).unwrap();
    log.skip(1);
    log.append(&[b'a'; 90]).unwrap();
    bytes_and_gaps(&mut log, 16);
    assert_eq!(backups_of(&path, 10), vec![]);
    assert_eq!(log.gaps.len(), MAX_GAPS);
    assert_eq!((log.current_start(), log.end_offset()), (101, 197));
    assert_eq!(log.disk_usage(), (80, 101));
    // The oldest file holds no gap: it goes, and so does the next, which holds one.
    let path = dir.path().join("two.log");
    let mut log = LogFile::open(&path, &dir.path().join("two.pos"), lim).unwrap();
    log.append(&[b'a'; 110]).unwrap();
    log.skip(1);
    log.append(&[b'a'; 90]).unwrap();
    assert_eq!(backups_of(&path, 10).len(), 1);
    bytes_and_gaps(&mut log, 16);
    assert_eq!(backups_of(&path, 10), vec![]);
    assert_eq!(log.gaps.len(), MAX_GAPS);
    assert_eq!((log.current_start(), log.end_offset()), (201, 297));
    assert_eq!(log.disk_usage(), (80, 201));
}

#[test]
fn gaps_a_power_cut_adds_are_shed_at_the_next_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let pos = dir.path().join("s.pos");
    let lim = limits(1 << 20, 1, LogMode::Rotate);
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    bytes_and_gaps(&mut log, MAX_GAPS);
    log.append(&[b'g'; 5]).unwrap();
    drop(log);
    // The power cut took the last 2 bytes: one more gap, past the limit.
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(83)
        .unwrap();
    let mut log = LogFile::open(&path, &pos, lim).unwrap();
    assert_eq!((log.gaps.len(), log.end_offset()), (MAX_GAPS + 1, 101));
    log.append(b"h").unwrap();
    log.skip(1);
    // All in the current file: it goes, as in a truncation, and with it every gap.
    assert_eq!(log.gaps.len(), 0);
    assert_eq!((log.current_start(), log.end_offset()), (103, 103));
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
}

#[test]
fn open_segments_opens_the_files_holding_the_offsets_asked_for() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log");
    let mut log = LogFile::open(
        &path,
        &dir.path().join("p"),
        limits(100, 2, LogMode::Rotate),
    )
    .unwrap();
    let data: Vec<u8> = (0..265u32).map(|i| i as u8).collect();
    log.append(&data[..250]).unwrap();
    log.skip(5);
    log.append(&data[255..]).unwrap();
    let open = log.open_segments(0).unwrap();
    let found: Vec<_> = open
        .iter()
        .map(|s| (s.start, s.len, s.file_pos, s.growable))
        .collect();
    assert_eq!(
        found,
        vec![
            (0, 100, 0, false),
            (100, 100, 0, false),
            (200, 50, 0, false),
            (255, 10, 50, true)
        ]
    );
    for s in &open {
        let mut bytes = vec![0; s.len as usize];
        s.file.read_exact_at(&mut bytes, s.file_pos).unwrap();
        assert_eq!(bytes, data[s.start as usize..(s.start + s.len) as usize]);
    }
    assert!(
        Arc::ptr_eq(&open[2].file, &open[3].file),
        "one file, opened once"
    );
    assert!(!Arc::ptr_eq(&open[1].file, &open[2].file));
    let starts = |from| -> Vec<u64> {
        log.open_segments(from)
            .unwrap()
            .iter()
            .map(|s| s.start)
            .collect()
    };
    assert_eq!(starts(99), vec![0, 100, 200, 255]);
    assert_eq!(starts(100), vec![100, 200, 255]);
    assert_eq!(starts(150), vec![100, 200, 255]);
    assert_eq!(starts(250), vec![255]);
    assert_eq!(starts(1000), vec![255], "the growing end is always offered");
    // The current file removed behind our back: its bytes are gone, the rest is offered.
    fs::remove_file(&path).unwrap();
    assert_eq!(starts(0), vec![0, 100]);
    // A file that cannot be opened for another reason is an error, not a gap.
    std::os::unix::fs::symlink("s.log", &path).unwrap();
    let error = log.open_segments(0).unwrap_err();
    assert_eq!(
        error.raw_os_error(),
        Some(rustix::io::Errno::LOOP.raw_os_error())
    );
}
