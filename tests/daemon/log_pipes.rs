//! Log pipes end to end against the real `conlogd`: rotation and the disk cap under odd-sized
//! writes, truncate mode, several writers on one stream, and a stream continued by a new pipe.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;

use conlog::proto::LogMode;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use support::*;

/// Writes `total` bytes of the test pattern into `pipe` in [`ODD_CHUNKS`]-sized chunks, from a
/// blocking thread; after every chunk it checks the files on disk against the cap. Returns the
/// number of samples taken.
async fn write_odd_chunks_checking_cap(
    pipe: File,
    total: u64,
    log_dir: PathBuf,
    guest: &'static str,
    stream: &'static str,
    max_size: u64,
    files_kept: u64,
) -> usize {
    tokio::task::spawn_blocking(move || {
        let mut pipe = pipe;
        let mut offset = 0u64;
        let mut samples = 0;
        for &chunk in ODD_CHUNKS.iter().cycle() {
            if offset == total {
                break;
            }
            let n = (chunk as u64).min(total - offset);
            pipe.write_all(&pattern(offset, n as usize))
                .expect("write into the log pipe");
            offset += n;
            check_cap(&log_dir, guest, stream, max_size, files_kept);
            samples += 1;
        }
        samples
    })
    .await
    .expect("writer thread")
}

/// The cap at one instant: at most `files_kept` files, each at most `max_size`, so at most
/// `max_size × files_kept` bytes. (A rotation between listing and `stat` can only make the
/// sample see a file twice or not at all; neither can exceed these bounds.)
fn check_cap(log_dir: &Path, guest: &str, stream: &str, max_size: u64, files_kept: u64) {
    let sizes = log_sizes(log_dir, guest, stream);
    assert!(
        sizes.len() as u64 <= files_kept,
        "more than {files_kept} files: {sizes:?}"
    );
    for (name, size) in &sizes {
        assert!(
            *size <= max_size,
            "{name} has {size} bytes > max_size {max_size}"
        );
    }
    let on_disk: u64 = sizes.iter().map(|(_, s)| s).sum();
    assert!(
        on_disk <= max_size * files_kept,
        "{on_disk} bytes on disk > cap {}: {sizes:?}",
        max_size * files_kept
    );
}

/// Rotation at `max_size` under a writer of 50× `max_size` in odd chunks: every byte is either
/// on disk or rotated away, in order, none duplicated, and the cap holds at every sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_tail_in_order_and_never_exceeds_the_cap() {
    const GUEST: &str = "vm-rotate";
    const STREAM: &str = "qemu";
    const MAX_SIZE: u64 = 4096;
    const BACKUPS: u32 = 3;
    // 50 × max_size plus a remainder, so that the current file ends part-full.
    let total = 50 * MAX_SIZE + 777;

    let daemon = Daemon::start_with(Some(NO_TIME_INDEX), &[]).await;
    let mut agent = daemon.agent().await;
    let (reply, pipe) = open_pipe(
        &mut agent,
        GUEST,
        STREAM,
        Some(limits(MAX_SIZE, BACKUPS, LogMode::Rotate)),
    )
    .await;
    assert_eq!(reply.offset, 0, "a new stream starts at offset 0");
    assert_eq!(
        Path::new(&reply.log_path),
        daemon.log_path(GUEST, STREAM),
        "log_path is <log_dir>/<guest>/<stream>.log"
    );

    let files_kept = u64::from(BACKUPS) + 1;
    let samples = write_odd_chunks_checking_cap(
        pipe,
        total,
        daemon.log_dir(),
        GUEST,
        STREAM,
        MAX_SIZE,
        files_kept,
    )
    .await;
    assert!(samples >= 10, "only {samples} cap samples");

    let info = wait_closed(&mut agent, GUEST, STREAM, total).await;
    assert_eq!(info.offset, total, "offset counts every byte written");
    assert_eq!(info.writers, 0);
    assert_eq!(info.max_size, MAX_SIZE);
    assert_eq!(info.max_backups, BACKUPS);
    assert_eq!(info.mode, i32::from(LogMode::Rotate));
    assert_eq!(
        info.rotations,
        total / MAX_SIZE,
        "one rotation per full file"
    );

    let names = log_file_names(&daemon.log_dir(), GUEST, STREAM);
    assert_eq!(
        names,
        ["qemu.log.3", "qemu.log.2", "qemu.log.1", "qemu.log"],
        "backups .1 (newest) … .3 and the current file"
    );
    let sizes = log_sizes(&daemon.log_dir(), GUEST, STREAM);
    for (name, size) in &sizes[..3] {
        assert_eq!(*size, MAX_SIZE, "{name}: a backup is a full file");
    }
    assert_eq!(
        sizes[3].1,
        total % MAX_SIZE,
        "current file holds the remainder"
    );
    check_cap(&daemon.log_dir(), GUEST, STREAM, MAX_SIZE, files_kept);

    let on_disk = read_log(&daemon.log_dir(), GUEST, STREAM);
    let len = on_disk.len() as u64;
    assert!(len <= MAX_SIZE * files_kept);
    let start = total - len;
    assert!(
        on_disk == pattern(start, len as usize),
        "the files, oldest first, are not exactly bytes {start}..{total} of what was written"
    );
    assert_eq!(info.bytes_on_disk, len, "ListGuests bytes_on_disk");
    assert_eq!(info.first_offset, start, "ListGuests first_offset");
}

/// Truncate mode: a single file that restarts at zero length when full; it holds the tail of
/// the written bytes starting at a multiple of `max_size`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_mode_keeps_one_file_with_the_tail() {
    const GUEST: &str = "vm-truncate";
    const STREAM: &str = "serial-out";
    const MAX_SIZE: u64 = 8192;
    let total = 50 * MAX_SIZE + 1234;

    let daemon = Daemon::start_with(Some(NO_TIME_INDEX), &[]).await;
    let mut agent = daemon.agent().await;
    let (reply, pipe) = open_pipe(
        &mut agent,
        GUEST,
        STREAM,
        Some(limits(MAX_SIZE, 3, LogMode::Truncate)),
    )
    .await;
    assert_eq!(reply.offset, 0);

    let samples =
        write_odd_chunks_checking_cap(pipe, total, daemon.log_dir(), GUEST, STREAM, MAX_SIZE, 1)
            .await;
    assert!(samples >= 10, "only {samples} cap samples");

    let info = wait_closed(&mut agent, GUEST, STREAM, total).await;
    assert_eq!(info.mode, i32::from(LogMode::Truncate));
    assert_eq!(
        log_file_names(&daemon.log_dir(), GUEST, STREAM),
        ["serial-out.log"],
        "truncate mode keeps no backups"
    );
    let on_disk = read_log(&daemon.log_dir(), GUEST, STREAM);
    let size = on_disk.len() as u64;
    assert!(size <= MAX_SIZE, "{size} bytes > max_size");
    let start = total - size;
    assert_eq!(
        start % MAX_SIZE,
        0,
        "the file restarts at a multiple of max_size"
    );
    assert_eq!(size, total % MAX_SIZE);
    assert!(
        on_disk == pattern(start, size as usize),
        "the file is not exactly bytes {start}..{total} of what was written"
    );
    assert_eq!(info.first_offset, start, "ListGuests first_offset");
    assert_eq!(info.bytes_on_disk, size, "ListGuests bytes_on_disk");
}

const LINE_LEN: usize = 16;

/// A fixed-length line `"<tag> <seq>…\n"`, shorter than PIPE_BUF so that pipe writes of
/// different writers never interleave inside it.
fn line(tag: char, seq: usize) -> String {
    let text = format!("{tag} {seq:08} ....\n");
    assert_eq!(text.len(), LINE_LEN);
    text
}

fn write_lines(pipe: File, tag: char, count: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut pipe = pipe;
        for seq in 0..count {
            // One write(2) per line: atomic on a pipe.
            pipe.write_all(line(tag, seq).as_bytes())
                .expect("write a line");
        }
    })
}

/// Several writers on one stream: a duplicated descriptor and a second `CreateLogPipe` while
/// the first pipe is open. Every line lands once, each writer's lines in order, offsets
/// continue, and once every writer has closed the stream is listed closed with its offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_writers_share_one_stream() {
    const GUEST: &str = "vm-writers";
    const STREAM: &str = "qemu";
    const FIRST: usize = 100;
    const EACH: usize = 2000;

    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let big = Some(limits(1 << 20, 3, LogMode::Rotate));
    let (first, mut pipe1) = open_pipe(&mut agent, GUEST, STREAM, big).await;
    assert_eq!(first.offset, 0);
    for seq in 0..FIRST {
        pipe1.write_all(line('P', seq).as_bytes()).unwrap();
    }
    let before = (FIRST * LINE_LEN) as u64;
    let info = wait_offset(&mut agent, GUEST, STREAM, before).await;
    assert!(info.open, "a pipe with a live writer is open");

    // A second pipe for the same stream while the first is still open.
    let (second, pipe2) = open_pipe(&mut agent, GUEST, STREAM, None).await;
    assert_eq!(
        second.offset, before,
        "the second pipe continues at the stream's offset"
    );
    assert_eq!(second.log_path, first.log_path);
    let info = find_stream(&mut agent, GUEST, STREAM).await.unwrap();
    assert_eq!(info.writers, 2, "two pipes feed the stream: {info:?}");
    assert!(info.open);

    let dup = pipe1.try_clone().expect("dup the write end");
    let writers = [
        write_lines(pipe1, 'A', EACH),
        write_lines(dup, 'B', EACH),
        write_lines(pipe2, 'C', EACH),
    ];
    for writer in writers {
        tokio::task::spawn_blocking(move || writer.join().expect("writer thread"))
            .await
            .unwrap();
    }

    let total = before + (3 * EACH * LINE_LEN) as u64;
    let info = wait_closed(&mut agent, GUEST, STREAM, total).await;
    assert_eq!(info.writers, 0);
    assert!(!info.open);

    let log = read_log(&daemon.log_dir(), GUEST, STREAM);
    assert_eq!(
        log.len() as u64,
        total,
        "every byte is in the (unrotated) log"
    );
    let text = String::from_utf8(log).expect("lines are ASCII");
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let expected_first: Vec<String> = (0..FIRST).map(|s| line('P', s)).collect();
    assert_eq!(
        lines[..FIRST],
        expected_first,
        "the first writer's lines come first"
    );
    for tag in ['A', 'B', 'C'] {
        let mine: Vec<&str> = lines[FIRST..]
            .iter()
            .copied()
            .filter(|l| l.starts_with(tag))
            .collect();
        let expected: Vec<String> = (0..EACH).map(|s| line(tag, s)).collect();
        assert!(
            mine == expected,
            "writer {tag}: {} lines, not its {EACH} lines in order",
            mine.len()
        );
    }
    assert_eq!(lines.len(), FIRST + 3 * EACH, "no torn or foreign lines");
}

/// A writer that closes, then a new `CreateLogPipe` for the same stream: the same log and
/// offsets continue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pipe_continues_a_closed_stream() {
    const GUEST: &str = "vm-continue";
    const STREAM: &str = "qemu";
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;

    let (first, pipe) = open_pipe(&mut agent, GUEST, STREAM, None).await;
    assert_eq!(first.offset, 0);
    write_and_close(pipe, pattern(0, 10_000)).await;
    let info = wait_closed(&mut agent, GUEST, STREAM, 10_000).await;
    assert!(
        !info.open,
        "a stream whose writers closed stays listed, closed"
    );

    let (second, pipe) = open_pipe(&mut agent, GUEST, STREAM, None).await;
    assert_eq!(
        second.offset, 10_000,
        "the new pipe's first byte gets the next offset"
    );
    assert_eq!(second.log_path, first.log_path, "same log file");
    write_and_close(pipe, pattern(10_000, 5_000)).await;
    wait_closed(&mut agent, GUEST, STREAM, 15_000).await;

    let log = read_log(&daemon.log_dir(), GUEST, STREAM);
    assert!(
        log == pattern(0, 15_000),
        "the log is not both writers' bytes in order"
    );
    assert_eq!(
        log_file_names(&daemon.log_dir(), GUEST, STREAM),
        ["qemu.log"]
    );
}
