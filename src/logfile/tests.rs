//! Tests of the log against a model and of its recovery from crashes and power cuts.

use super::*;
use std::fs;

fn limits(max_size: u64, max_backups: u32, mode: LogMode) -> LogLimits {
    LogLimits {
        max_size,
        max_backups,
        mode,
    }
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
