//! conlogd's side of `keeper.sock`: one blocking connection, and starting a keeper.
//!
//! Used only from the keeper thread of [`super`] and at start-up, never from an async task.

use super::protocol::{self, CLEAR, ENTRY, ERROR, FETCH, OK, QUIT, REMOVE, STORE};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started keeper may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A served connection to the keeper.
pub(crate) struct Connection {
    socket: OwnedFd,
}

fn refused(bytes: &[u8]) -> io::Error {
    io::Error::other(format!(
        "keeper: {}",
        String::from_utf8_lossy(bytes.get(1..).unwrap_or_default())
    ))
}

impl Connection {
    /// Connects and reads the greeting. A keeper serving another client answers
    /// `ResourceBusy`; none listening is `NotFound` or `ConnectionRefused`.
    pub(crate) fn connect(path: &Path) -> io::Result<Self> {
        let socket = protocol::seqpacket()?;
        let address = rustix::net::SocketAddrUnix::new(path)?;
        rustix::net::connect(&socket, &address)?;
        protocol::bound_sends(&socket)?;
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(protocol::SEND_TIMEOUT),
        )?;
        let greeting = protocol::recv(&socket)?;
        match greeting.bytes.split_first() {
            Some((&OK, hello)) if hello == protocol::HELLO => Ok(Self { socket }),
            Some((&ERROR, text)) if text.starts_with(b"busy") => Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                refused(&greeting.bytes),
            )),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a conlog keeper (greeting {:?})", greeting.bytes),
            )),
        }
    }

    fn request(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        protocol::send(&self.socket, bytes, fds)?;
        let reply = protocol::recv(&self.socket)?;
        match reply.bytes.first() {
            Some(&OK) => Ok(()),
            _ => Err(refused(&reply.bytes)),
        }
    }

    /// Stores `fd` as `name` (replacing what was held under it).
    pub(crate) fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.request(&[&[STORE], name.as_bytes()].concat(), &[fd])
    }

    /// Closes what is held as `name`.
    pub(crate) fn remove(&self, name: &str) -> io::Result<()> {
        self.request(&[&[REMOVE], name.as_bytes()].concat(), &[])
    }

    /// Closes everything held.
    pub(crate) fn clear(&self) -> io::Result<()> {
        self.request(&[CLEAR], &[])
    }

    /// Closes everything held and ends the keeper.
    pub(crate) fn quit(&self) -> io::Result<()> {
        self.request(&[QUIT], &[])
    }

    /// Duplicates of everything held, by name.
    pub(crate) fn fetch(&self) -> io::Result<Vec<(String, OwnedFd)>> {
        protocol::send(&self.socket, &[FETCH], &[])?;
        let mut entries = Vec::new();
        loop {
            let mut message = protocol::recv(&self.socket)?;
            match message.bytes.split_first() {
                Some((&ENTRY, name)) if message.fds.len() == 1 => {
                    let name = protocol::check_name(name)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    entries.push((name.to_owned(), message.fds.pop().expect("one")));
                }
                Some((&OK, count)) if count.len() == 4 => {
                    let count = u32::from_le_bytes(count.try_into().expect("4 bytes")) as usize;
                    if count != entries.len() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("keeper announced {count} entries, sent {}", entries.len()),
                        ));
                    }
                    return Ok(entries);
                }
                _ => return Err(refused(&message.bytes)),
            }
        }
    }

    /// False once the keeper has closed its side (it never sends unsolicited messages).
    pub(crate) fn alive(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut fds = [PollFd::new(&self.socket, PollFlags::IN)];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&zero)) {
            Ok(0) => true,
            Ok(_) => false,
            Err(_) => true,
        }
    }
}

/// Starts `conlogd keeper` for `runtime_dir`, detached in its own session (it calls `setsid`
/// itself), and waits until it answers. The caller reaps the returned child.
pub(crate) fn spawn(runtime_dir: &Path) -> io::Result<(Child, Connection)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("keeper")
        .arg("--runtime-dir")
        .arg(runtime_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .env_remove("CONLOG_FAULT_POINTS")
        .spawn()?;
    let path = super::server::socket_path(runtime_dir);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match Connection::connect(&path) {
            Ok(connection) => return Ok((child, connection)),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => {}
        }
        if let Some(status) = child.try_wait()? {
            // Lost a race with another keeper (it holds the lock): connect to that one.
            if status.success() {
                let connection = Connection::connect(&path)?;
                return Ok((child, connection));
            }
            return Err(io::Error::other(format!("the keeper exited ({status})")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
