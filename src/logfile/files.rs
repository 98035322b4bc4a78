//! The file-system steps of a stream's log: names of backups, opening, removing, renaming and
//! making a directory's entries durable.
//!
//! Owns nothing but these helpers: no offsets, no record. Every function does one system call
//! (or a short, bounded series of them) and reports what the file system said.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How far past `max_backups` stale backups are looked for.
pub(crate) const MAX_SCAN: u32 = 1000;

/// `<log>.N`.
pub fn backup_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Existing backups `.1 ..= .max` (each `.N`, or `.N.zst` when compressed) with the raw bytes
/// they hold, newest first, stopping at the first gap (and at a compressed file whose header
/// cannot be read: what is older cannot be placed).
pub fn backups_of(path: &Path, max: u32) -> Vec<(PathBuf, u64)> {
    super::compression::backups(path, max)
        .into_iter()
        .map_while(|b| Some((b.path, b.raw_len?)))
        .collect()
}

/// Removes backups `.first ..= .last` and their indexes, oldest (highest number) first, so a
/// crash half-way leaves `.1 .. .k` without a hole. A log goes before its index: a crash
/// between the two leaves an orphan index (removed at the next open), never a log without
/// the times it had.
pub(crate) fn remove_backups(path: &Path, first: u32, last: u32) -> io::Result<()> {
    for n in (first..=last).rev() {
        let backup = backup_path(path, n);
        remove_if_exists(&backup)?;
        remove_if_exists(&super::seekable::zst_path(path, n))?;
        remove_if_exists(&super::index::index_path(&backup))?;
    }
    Ok(())
}

/// Bytes of the index of the log file at `log` (0 if it has none); a compressed `.N.zst`
/// keeps the index of `.N`.
pub(crate) fn index_len(log: &Path) -> u64 {
    fs::symlink_metadata(super::index::index_path(&super::compression::raw_name(log)))
        .ok()
        .filter(fs::Metadata::is_file)
        .map_or(0, |m| m.len())
}

/// Removes a log file (raw or compressed) and the index beside it; true if the log file was
/// there.
pub(crate) fn remove_log_file(path: &Path) -> io::Result<bool> {
    let existed = match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    remove_if_exists(&super::index::index_path(&super::compression::raw_name(
        path,
    )))?;
    Ok(existed)
}

/// Deletes every file of the stream whose current file is `path`: its backups oldest first,
/// then the current file, each with its index, so that a crash half-way leaves `.1 .. .k` and
/// the current file without a hole (and a second call finishes the job). Returns how many log
/// files were deleted. The caller makes sure no writer has the stream open; readers that hold
/// a file keep reading it (an unlinked file keeps its bytes while open).
pub(crate) fn delete_stream_files(path: &Path) -> io::Result<u32> {
    let backups: Vec<PathBuf> = backups_of(path, MAX_SCAN)
        .into_iter()
        .map(|(backup, _)| backup)
        .collect();
    let deleted = remove_oldest_first(&backups, || crate::fault::point("logfile.delete.file"))?;
    Ok(deleted + u32::from(remove_log_file(path)?))
}

/// Removes log files (raw or compressed) given newest first, each with its index, oldest
/// first, so that a crash or an error half-way leaves the newest ones without a hole; calls
/// `after_each` after each. Returns how many log files were there.
pub(crate) fn remove_oldest_first(
    newest_first: &[PathBuf],
    mut after_each: impl FnMut(),
) -> io::Result<u32> {
    let mut removed = 0;
    for file in newest_first.iter().rev() {
        if remove_log_file(file)? {
            removed += 1;
        }
        after_each();
    }
    Ok(removed)
}

/// Deletes the files of a stream that nobody writes (a removed one) whose newest byte (their
/// mtime: nothing rewrites them) is older than `cutoff`: the first such file, newest first from
/// the current one, goes with every older one, oldest first, each with its index. Returns how
/// many log files went and whether none is left.
pub(crate) fn expire_unwritten(
    path: &Path,
    cutoff: std::time::SystemTime,
) -> io::Result<(u32, bool)> {
    let mut files: Vec<PathBuf> = Vec::new();
    if fs::symlink_metadata(path).is_ok() {
        files.push(path.to_owned());
    }
    files.extend(
        backups_of(path, MAX_SCAN)
            .into_iter()
            .map(|(backup, _)| backup),
    );
    let old = |file: &PathBuf| {
        fs::metadata(file)
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified < cutoff)
    };
    let Some(first) = files.iter().position(old) else {
        return Ok((0, files.is_empty()));
    };
    let deleted = remove_oldest_first(&files[first..], || {})?;
    Ok((deleted, first == 0))
}

/// Opens (creating) a log file for appending at its end.
pub(crate) fn open_log(path: &Path) -> io::Result<File> {
    // Not O_APPEND: splice(2) refuses append-mode files. We are the only writer and keep the
    // file position at the end ourselves.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .custom_flags(rustix::fs::OFlags::CLOEXEC.bits().cast_signed())
        .open(path)?;
    io::Seek::seek(&mut file, io::SeekFrom::End(0))?;
    Ok(file)
}

/// Opens `path` with `open`, creating its parent directories only if they are missing.
pub(crate) fn creating_parent(
    path: &Path,
    open: fn(&Path) -> io::Result<File>,
) -> io::Result<File> {
    match open(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            open(path)
        }
        result => result,
    }
}

/// Makes the entries of the directory holding `path` durable (creations, renames, unlinks).
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash leaves either
/// the old or the new content, never a torn one.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

pub(crate) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub(crate) fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_the_content_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }

    #[test]
    fn only_a_missing_file_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        remove_if_exists(&missing).unwrap();
        rename_if_exists(&missing, &dir.path().join("other")).unwrap();
        // A directory where a log file should be: unlinking or replacing it must fail loudly.
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("inside"), b"x").unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        let kind = |r: io::Result<()>| r.unwrap_err().kind();
        assert_eq!(kind(remove_if_exists(&sub)), ErrorKind::IsADirectory);
        assert!(sub.join("inside").exists());
        assert_eq!(kind(rename_if_exists(&file, &sub)), ErrorKind::IsADirectory);
        assert_eq!(fs::read(&file).unwrap(), b"x");
        // An existing file goes, and is moved.
        rename_if_exists(&file, &dir.path().join("moved")).unwrap();
        assert!(!file.exists());
        remove_if_exists(&dir.path().join("moved")).unwrap();
        assert!(!dir.path().join("moved").exists());
    }
}
