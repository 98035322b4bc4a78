//! Child processes with a deadline, a process's descriptors, and plain HTTP.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use super::{DEADLINE, POLL};

/// Runs `cmd` to completion with stdin closed, killing it (and failing) after `DEADLINE`.
/// Blocking: call from `spawn_blocking` in async tests.
pub fn run_bounded(cmd: &mut Command) -> Output {
    let dir = tempfile::tempdir().expect("temporary directory");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {DEADLINE:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(POLL);
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).expect("read stdout"),
        stderr: std::fs::read(&err_path).expect("read stderr"),
    }
}

/// [`run_bounded`] from async code.
pub async fn run_bounded_async(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || run_bounded(&mut cmd))
        .await
        .expect("command task")
}

/// Text of a process output for failure messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Number of open descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .count()
}

/// A description of the descriptors of `pid` (what each points to, counted), for messages.
pub fn describe_fds(pid: u32) -> String {
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in entries.flatten() {
            let target = std::fs::read_link(entry.path())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kind = match target.split_once(':') {
                Some((kind, _)) if !target.starts_with('/') => kind.to_owned(),
                _ => target,
            };
            *kinds.entry(kind).or_default() += 1;
        }
    }
    format!("{kinds:?}")
}

/// `GET path` over plain HTTP/1.1; returns the status line and body.
pub fn http_get(address: SocketAddr, path: &str) -> (String, String) {
    use std::net::TcpStream;
    let mut stream = TcpStream::connect(address).expect("connect to the HTTP endpoint");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the HTTP response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed HTTP response: {response:?}"));
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// Value of an unlabelled Prometheus sample `name`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
