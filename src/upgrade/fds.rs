//! The one place that turns raw descriptor numbers into owned descriptors.
//!
//! After an in-place upgrade the new image finds its descriptors by number (listed in the
//! snapshot); everything else it inherited is closed here. Nothing else in conlog touches raw
//! descriptor numbers.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};

/// Takes ownership of inherited descriptor `raw`, after checking it is open.
pub(crate) fn adopt(raw: RawFd) -> io::Result<OwnedFd> {
    if raw <= 2 {
        return Err(io::Error::other(format!(
            "descriptor {raw} is a standard stream, not a carried one"
        )));
    }
    // Check that the number refers to an open descriptor before claiming it.
    let path = format!("/proc/self/fd/{raw}");
    std::fs::symlink_metadata(&path)
        .map_err(|e| io::Error::other(format!("descriptor {raw} is not open: {e}")))?;
    // SAFETY: the previous image of this process left `raw` open for us and listed it in the
    // snapshot exactly once; nothing else in this process has claimed it (the caller adopts each
    // listed number once, before any other code runs), so this OwnedFd is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Closes every inherited descriptor above 2 except `keep` (the carried ones).
pub(crate) fn close_inherited_except(keep: &[RawFd]) -> io::Result<()> {
    let keep: HashSet<RawFd> = keep.iter().copied().collect();
    let mut stray = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(raw) = entry?.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        if raw > 2 && !keep.contains(&raw) {
            stray.push(raw);
        }
    }
    for raw in stray {
        // The read_dir handle itself was listed too and is closed by now; EBADF is expected then.
        if std::fs::symlink_metadata(format!("/proc/self/fd/{raw}")).is_ok() {
            // SAFETY: `raw` is open, was inherited (this runs first thing at start-up, before
            // any other code opened descriptors we would still use), and is not a carried one,
            // so nothing owns it: dropping this OwnedFd closes it.
            drop(unsafe { OwnedFd::from_raw_fd(raw) });
        }
    }
    Ok(())
}

/// Makes a descriptor survive (or not) `execve`.
pub(crate) fn set_inheritable(fd: impl AsFd, inheritable: bool) -> io::Result<()> {
    let flags = if inheritable {
        rustix::io::FdFlags::empty()
    } else {
        rustix::io::FdFlags::CLOEXEC
    };
    rustix::io::fcntl_setfd(fd, flags)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The modules of `src/` that opt back in to `unsafe_code`, as `a::b` paths.
    fn opted_in(dir: &Path, prefix: &str, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "bin" {
                    opted_in(&path, &format!("{prefix}{name}::"), found);
                }
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let opts_in = text.lines().any(|line| {
                let line = line.trim_start();
                line.starts_with("#[allow(unsafe_code)]")
                    || line.starts_with("#![allow(unsafe_code)]")
            });
            if opts_in {
                found.push(match name.as_str() {
                    "mod" => prefix.trim_end_matches("::").to_owned(),
                    _ => format!("{prefix}{name}"),
                });
            }
        }
    }

    /// lib.rs lists every module that opts back in to `unsafe_code`, and only those.
    #[test]
    fn every_unsafe_opt_in_is_listed_in_lib_rs() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = Vec::new();
        opted_in(&src, "", &mut found);
        found.sort();
        let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
        let section = lib
            .split("//! # Unsafe code")
            .nth(1)
            .expect("lib.rs has an \"Unsafe code\" section");
        let mut listed: Vec<String> = section
            .lines()
            .skip(1)
            .take_while(|line| line.starts_with("//!"))
            .filter_map(|line| line.strip_prefix("//! - `"))
            .filter_map(|line| line.split('`').next())
            .map(str::to_owned)
            .collect();
        listed.sort();
        assert_eq!(
            listed, found,
            "lib.rs's list of unsafe opt-ins vs the source"
        );
    }
}
