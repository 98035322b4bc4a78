//! The wire protocol of `keeper.sock`, and the blocking socket calls both sides use.
//!
//! # Wire protocol of `keeper.sock` (SOCK_SEQPACKET UNIX socket, mode 0600)
//!
//! Every message is one datagram of at most [`MAX_MESSAGE`] (256) bytes; descriptors travel as
//! `SCM_RIGHTS` ancillary data of the message they belong to. A message longer than that, or
//! with more descriptors than its kind carries, is a protocol error: the keeper answers
//! `0x01 text` and closes the connection (descriptors that came with it are closed).
//!
//! 1. On accept the keeper checks the peer (`SO_PEERCRED`): another uid is closed without a
//!    word. Then it sends one greeting:
//!    - `0x00` `CONLOG-KEEPER 1` (ASCII): served; the connection is the keeper's only client.
//!    - `0x01` UTF-8 text (`busy: …`): another client is connected; the keeper closes this one.
//! 2. Requests (client → keeper), byte 0 is the operation:
//!
//!    | bytes | descriptors | meaning |
//!    | --- | --- | --- |
//!    | `S` (0x53), name | exactly 1 | store the descriptor as `name`, replacing (closing) one held under that name |
//!    | `R` (0x52), name | 0 | remove (close) the descriptor held as `name`; unknown names are not an error |
//!    | `F` (0x46) | 0 | fetch: a duplicate of every held descriptor, held ones stay held |
//!    | `C` (0x43) | 0 | clear: close every held descriptor |
//!    | `Q` (0x51) | 0 | clear, answer, and exit |
//!
//!    A name is 1 to [`MAX_NAME`] (255) bytes, each printable ASCII (`0x21..=0x7e`) other
//!    than `:` (so the same names are valid `FDNAME=`s of systemd's store).
//! 3. Replies (keeper → client), one per request, in order:
//!    - `0x00`: done. For `F`, first one message `0x02` name per held descriptor with that
//!      descriptor attached, in name order, then `0x00` followed by the count of entries sent
//!      as 4 bytes little-endian.
//!    - `0x01` UTF-8 text: refused (bad name, a store over the descriptor cap); the connection
//!      stays usable unless the text follows a protocol error.
//!
//! The keeper never sends anything unsolicited, so a readable or hung-up socket on the client
//! side while no reply is due means the keeper is gone. Replies are sent with a 10 s send
//! timeout: a client that stops reading is disconnected, never waited for.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

/// The greeting after `0x00`.
pub const HELLO: &[u8] = b"CONLOG-KEEPER 1";
/// Longest message, either way.
pub(crate) const MAX_MESSAGE: usize = 256;
/// Longest descriptor name.
pub(crate) const MAX_NAME: usize = 255;
/// How long either side waits for the other to take a message.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(10);

pub const OK: u8 = 0x00;
pub const ERROR: u8 = 0x01;
pub const ENTRY: u8 = 0x02;
pub(crate) const STORE: u8 = b'S';
pub const REMOVE: u8 = b'R';
pub const FETCH: u8 = b'F';
pub const CLEAR: u8 = b'C';
pub const QUIT: u8 = b'Q';

/// Why a name cannot be held.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NameError {
    #[error("empty descriptor name")]
    Empty,
    #[error("descriptor name longer than {MAX_NAME} bytes")]
    TooLong,
    #[error("byte 0x{0:02x} in a descriptor name (printable ASCII other than ':')")]
    BadByte(u8),
}

/// Checks a name against the rule in the module doc.
pub(crate) fn check_name(name: &[u8]) -> Result<&str, NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    if let Some(bad) = name.iter().find(|b| !b.is_ascii_graphic() || **b == b':') {
        return Err(NameError::BadByte(*bad));
    }
    Ok(std::str::from_utf8(name).expect("printable ASCII is UTF-8"))
}

/// One received message.
#[derive(Debug)]
pub struct Message {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Sends one message with `fds` attached (blocking; bounded by the socket's send timeout).
pub fn send(socket: impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    debug_assert!(bytes.len() <= MAX_MESSAGE && fds.len() <= 1);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(fds));
    }
    loop {
        match sendmsg(
            &socket,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short send")),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message (blocking). End of stream is `UnexpectedEof`; a message longer than
/// [`MAX_MESSAGE`] or with more than one descriptor is `InvalidData` (its descriptors closed).
pub fn recv(socket: impl AsFd) -> io::Result<Message> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut buffer = [0u8; MAX_MESSAGE + 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        match recvmsg(
            &socket,
            &mut [IoSliceMut::new(&mut buffer)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(received) => break received,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if received.bytes == 0 && fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        ));
    }
    if received.bytes > MAX_MESSAGE
        || received
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
        || fds.len() > 1
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of more than {MAX_MESSAGE} bytes or more than one descriptor refused"),
        ));
    }
    Ok(Message {
        bytes: buffer[..received.bytes].to_vec(),
        fds,
    })
}

/// A SOCK_SEQPACKET socket, close-on-exec.
pub fn seqpacket() -> io::Result<OwnedFd> {
    use rustix::net::{socket_with, AddressFamily, SocketFlags, SocketType};
    Ok(socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sets the send timeout of `socket` to [`SEND_TIMEOUT`].
pub(crate) fn bound_sends(socket: impl AsFd) -> io::Result<()> {
    rustix::net::sockopt::set_socket_timeout(
        socket,
        rustix::net::sockopt::Timeout::Send,
        Some(SEND_TIMEOUT),
    )?;
    Ok(())
}

/// `0x01 text`, cut to fit one message.
pub(crate) fn error_message(text: &str) -> Vec<u8> {
    let mut bytes = vec![ERROR];
    let mut end = text.len().min(MAX_MESSAGE - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    bytes.extend_from_slice(&text.as_bytes()[..end]);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        assert_eq!(check_name(b"pipe/vm-1/qemu/42"), Ok("pipe/vm-1/qemu/42"));
        assert_eq!(check_name(b""), Err(NameError::Empty));
        assert_eq!(check_name(&[b'a'; 256]), Err(NameError::TooLong));
        assert!(check_name(&[b'a'; 255]).is_ok());
        assert_eq!(check_name(b"a:b"), Err(NameError::BadByte(b':')));
        assert_eq!(check_name(b"a b"), Err(NameError::BadByte(b' ')));
        assert_eq!(check_name(b"a\xffb"), Err(NameError::BadByte(0xff)));
    }

    #[test]
    fn error_messages_fit_and_stay_utf8() {
        let long = "é".repeat(400);
        let message = error_message(&long);
        assert!(message.len() <= MAX_MESSAGE);
        assert!(std::str::from_utf8(&message[1..]).is_ok());
    }

    #[test]
    fn messages_and_descriptors_round_trip() {
        let (a, b) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let (read, write) = rustix::pipe::pipe().unwrap();
        send(&a, b"Sname", &[read.as_fd()]).unwrap();
        let message = recv(&b).unwrap();
        assert_eq!(message.bytes, b"Sname");
        assert_eq!(message.fds.len(), 1);
        rustix::io::write(&write, b"x").unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(rustix::io::read(&message.fds[0], &mut byte).unwrap(), 1);
        // Too long: refused, not truncated silently.
        send(&a, &[b'x'; MAX_MESSAGE], &[]).unwrap();
        assert_eq!(recv(&b).unwrap().bytes.len(), MAX_MESSAGE);
        rustix::net::send(
            &a,
            &[b'x'; MAX_MESSAGE + 10],
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        assert_eq!(
            recv(&b).unwrap_err().kind(),
            io::ErrorKind::InvalidData,
            "an oversized message is refused"
        );
        drop(a);
        assert_eq!(recv(&b).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
