//! Takeover by a successor process through `handover.sock`.
//!
//! # Wire protocol (SOCK_STREAM UNIX socket, `<runtime_dir>/handover.sock`, mode 0600)
//!
//! 1. successor → daemon: the line `CONLOG-TAKEOVER 1\n` (the snapshot format it reads), within
//!    30 s, and nothing more until step 5. The daemon reads every connection's hello on a task
//!    of its own ([`accept`]), so a client that is silent, trickles bytes or sends garbage
//!    delays neither a real successor nor the daemon's own loop; it is dropped at its first
//!    wrong byte, at end of stream or after 30 s, and nothing is frozen for it (its refusal is
//!    logged at a bounded rate, [`crate::ratelimit`]).
//! 2. Only if the hello was exact and the successor is still connected with nothing more sent
//!    ([`check_quiet`]), the daemon freezes every stream (nothing more is read from pipes or
//!    guests; unread bytes wait in the kernel) and stops its gRPC servers (pending connections
//!    wait in the listening sockets' backlogs, which are carried, so no connection is refused).
//! 3. daemon → successor: the snapshot envelope (see [`super::snapshot`]; `inherited` is null,
//!    `descriptors` is N).
//! 4. daemon → successor: ⌈N / 253⌉ messages, each 4 bytes of data (the little-endian count k,
//!    1 ≤ k ≤ 253, the kernel's SCM_MAX_FD) with k descriptors attached as SCM_RIGHTS, in
//!    snapshot order.
//! 5. successor → daemon: `OK\n` once it has received and checked the state, before it
//!    restores, reads or writes anything.
//! 6. daemon → successor, the verdict: `GO\n` if the `OK` arrived within 30 s of step 2: the
//!    daemon has committed, will never thaw, and exits 0 without removing any socket (or idles,
//!    with `--linger-after-handover`). Otherwise (anything else, end of stream, or too late)
//!    `NO\n`, and the daemon thaws its state and keeps serving.
//! 7. The successor adopts the state and serves only after `GO`, or after end of stream once
//!    the daemon's process is gone (it died after sending the state; nobody else holds the
//!    streams). On `NO`, or end of stream while the daemon still runs, it exits without having
//!    touched a log. So a takeover that fails never leaves two processes writing one log: the
//!    daemon writes again only when it has not committed, and then the successor never starts.
//!
//! Snapshots of images that predate step 6 have `verdicts: false`: their daemon exits after
//! the `OK` without a verdict, and the successor proceeds after sending it.

use super::snapshot::{self, Envelope, FORMAT_VERSION};
use super::FrozenDaemon;
use std::io::{self, ErrorKind, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

/// Most descriptors in one SCM_RIGHTS message (the kernel's SCM_MAX_FD).
pub(crate) const BATCH: usize = 253;
/// How long either side waits for the other.
const TIMEOUT: Duration = Duration::from_secs(30);

fn hello() -> String {
    format!("CONLOG-TAKEOVER {FORMAT_VERSION}\n")
}

/// Daemon side, step 1: accepts connections on `handover.sock` until the task is dropped,
/// reads each one's hello on a task of its own (in a span naming the peer's pid), and passes
/// on only the connections that sent an exact hello. Dropping this task drops the connections
/// still saying hello. Any local peer can connect at will: what it causes is logged at a
/// bounded rate ([`crate::limited`]).
pub(crate) async fn accept(listener: UnixListener, successors: mpsc::Sender<UnixStream>) {
    let mut greeting = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => {
                    let peer_pid = stream.peer_cred().ok().and_then(|c| c.pid());
                    let span = tracing::info_span!("takeover_request", peer_pid);
                    greeting.spawn(
                        async move {
                            match read_hello(&mut stream).await {
                                Ok(()) => Some(stream),
                                Err(e) => {
                                    crate::limited!(warn, error = %e, "ignoring a bad takeover request");
                                    None
                                }
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    crate::limited!(warn, error = %e, "handover.sock accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(greeted) = greeting.join_next() => match greeted {
                Ok(Some(stream)) => {
                    if successors.send(stream).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => crate::limited!(error, error = %e, "reading a takeover request failed"),
            },
        }
    }
}

/// Reads exactly the hello's length (never past it), refusing at the first wrong byte.
async fn read_hello(stream: &mut UnixStream) -> io::Result<()> {
    let expected = hello().into_bytes();
    let mut got = Vec::with_capacity(expected.len());
    let read = async {
        let mut buf = [0u8; 64];
        while got.len() < expected.len() {
            let n = stream.read(&mut buf[..expected.len() - got.len()]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed during the hello",
                ));
            }
            got.extend_from_slice(&buf[..n]);
            if !expected.starts_with(&got) {
                return Err(io::Error::other("unexpected hello"));
            }
        }
        Ok(())
    };
    let result = tokio::time::timeout(TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(ErrorKind::TimedOut, "no hello in time")));
    result.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{e} after {:?} (this daemon speaks {:?})",
                String::from_utf8_lossy(&got),
                hello().trim()
            ),
        )
    })
}

/// Daemon side, between steps 1 and 2: the successor must still be connected and must not
/// have sent anything after its hello. Checked right before freezing, so a client that said
/// hello and then more, or went away, freezes nothing.
pub(crate) async fn check_quiet(stream: &UnixStream) -> io::Result<()> {
    // A peer that sends its hello and then closes or keeps talking shows it within moments; a
    // real successor stays silent until it has the state. The grace is taken while the daemon
    // still serves, so it lengthens no pause. The whole grace is waited for: readiness left
    // over from reading the hello is cleared by the first peek, not taken as news.
    let deadline = tokio::time::Instant::now() + QUIET_GRACE;
    loop {
        match stream.try_io(tokio::io::Interest::READABLE, || peek(stream)) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the successor went away after its hello",
                ))
            }
            Ok(_) => return Err(io::Error::other("the successor sent more than its hello")),
        }
        if tokio::time::timeout_at(deadline, stream.readable())
            .await
            .is_err()
        {
            return Ok(());
        }
    }
}

/// How long [`check_quiet`] watches a peer after its hello.
const QUIET_GRACE: Duration = Duration::from_millis(100);

/// Peeks at one byte without waiting: `WouldBlock` when the peer has sent nothing more.
fn peek(stream: &UnixStream) -> io::Result<usize> {
    use rustix::net::{recv, RecvFlags};
    let mut byte = [0u8; 1];
    match recv(stream, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((n, _)) => Ok(n),
        Err(rustix::io::Errno::AGAIN) => Err(ErrorKind::WouldBlock.into()),
        Err(e) => Err(e.into()),
    }
}

/// Daemon side, steps 3–6: sends the state, waits for the successor's `OK` and gives the
/// verdict. `Ok` means committed: the caller must exit and never use the state again. On
/// failure the state comes back so the daemon can thaw it; the successor was told `NO`.
pub(crate) async fn send(
    stream: &mut UnixStream,
    state: FrozenDaemon,
) -> Result<(), (FrozenDaemon, io::Error)> {
    let (snapshot, carried) = state.index();
    let envelope = Envelope {
        snapshot,
        descriptors: carried.len(),
        inherited: None,
    };
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let result = tokio::time::timeout_at(deadline, send_parts(stream, &envelope, &carried)).await;
    let error = match result {
        // The deadline is checked once more: an `OK` read after it is refused, so the
        // successor, which waits longer than that for its verdict, never gives up on a daemon
        // that commits.
        Ok(Ok(())) if tokio::time::Instant::now() < deadline => {
            crate::fault::point("takeover.commit");
            if let Err(e) = tokio::time::timeout(TIMEOUT, stream.write_all(b"GO\n")).await {
                tracing::warn!(error = %e, "cannot send the verdict; the successor goes on once this process is gone");
            }
            return Ok(());
        }
        Ok(Ok(())) => io::Error::new(ErrorKind::TimedOut, "the successor confirmed too late"),
        Ok(Err(e)) => e,
        Err(_) => io::Error::new(ErrorKind::TimedOut, "the successor did not confirm in time"),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(b"NO\n")).await;
    let _ = stream.shutdown().await;
    let state =
        FrozenDaemon::resolve(envelope.snapshot, carried).expect("indexes we just made are valid");
    Err((state, error))
}

async fn send_parts(
    stream: &mut UnixStream,
    envelope: &Envelope,
    carried: &[OwnedFd],
) -> io::Result<()> {
    stream.write_all(&snapshot::encode(envelope)).await?;
    for batch in carried.chunks(BATCH) {
        send_batch(stream, batch).await?;
    }
    let mut answer = [0u8; 3];
    stream.read_exact(&mut answer).await?;
    if &answer != b"OK\n" {
        return Err(io::Error::other(format!(
            "the successor answered {:?}",
            String::from_utf8_lossy(&answer)
        )));
    }
    Ok(())
}

async fn send_batch(stream: &UnixStream, batch: &[OwnedFd]) -> io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let count = u32::try_from(batch.len())
        .map_err(|_| io::Error::other("too many descriptors for one batch"))?
        .to_le_bytes();
    let borrowed: Vec<_> = batch.iter().map(|fd| fd.as_fd()).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
    loop {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&borrowed));
            sendmsg(
                stream,
                &[IoSlice::new(&count)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(4) => return Ok(()),
            Ok(n) => return Err(io::Error::other(format!("sent {n} of 4 count bytes"))),
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Successor side, steps 1 and 3–7: connects, receives the state, confirms it and waits for
/// the verdict. `Ok` means the state is this process's alone: adopt and serve it. An error
/// means the running daemon keeps (or may keep) serving: exit without touching a log.
pub(crate) async fn receive(runtime_dir: &Path) -> io::Result<FrozenDaemon> {
    let path = runtime_dir.join("handover.sock");
    let mut stream = UnixStream::connect(&path).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to {}: {e}", path.display()),
        )
    })?;
    stream.write_all(hello().as_bytes()).await?;
    let (state, from_pid, verdicts) = tokio::time::timeout(TIMEOUT, receive_parts(&mut stream))
        .await
        .map_err(|_| {
            io::Error::new(
                ErrorKind::TimedOut,
                "the running daemon did not send its state",
            )
        })??;
    crate::fault::point("takeover.received");
    let confirmed = stream.write_all(b"OK\n").await;
    if !verdicts {
        confirmed?;
    } else {
        // Even if the `OK` could not be sent (the daemon gave up and closed), its verdict
        // waits to be read.
        if let Err(e) = confirmed {
            tracing::warn!(error = %e, "cannot confirm the takeover");
        }
        await_verdict(&mut stream, from_pid).await?;
    }
    Ok(state)
}

/// How long the successor waits for the verdict: far longer than the daemon's own deadline
/// (30 s from step 2, after which it can only say `NO`), so the two never give up on each
/// other.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a daemon that closed the connection without a verdict may take to disappear.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// Step 7: `Ok` on `GO`, or on end of stream once the daemon's process `pid` is gone.
async fn await_verdict(stream: &mut UnixStream, pid: u32) -> io::Result<()> {
    let mut verdict = Vec::with_capacity(3);
    let read = async {
        let mut byte = [0u8; 1];
        while verdict.len() < 3 {
            if stream.read(&mut byte).await? == 0 {
                break;
            }
            verdict.push(byte[0]);
        }
        io::Result::Ok(())
    };
    match tokio::time::timeout(VERDICT_TIMEOUT, read).await {
        Err(_) => {
            return Err(io::Error::new(
                ErrorKind::TimedOut,
                format!("no verdict from the running daemon (pid {pid}) in {VERDICT_TIMEOUT:?}"),
            ))
        }
        // A reset connection is an end of stream too: whether the daemon is gone decides.
        Ok(Err(e)) => tracing::warn!(error = %e, "reading the verdict failed"),
        Ok(Ok(())) => {}
    }
    match verdict.as_slice() {
        b"GO\n" => Ok(()),
        b"NO\n" => Err(io::Error::other(
            "the running daemon refused the takeover and serves on",
        )),
        [] => {
            let deadline = tokio::time::Instant::now() + EXIT_GRACE;
            while process_alive(pid) {
                if tokio::time::Instant::now() > deadline {
                    return Err(io::Error::other(format!(
                        "the running daemon (pid {pid}) closed the takeover without a verdict and still runs"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::warn!(
                pid,
                "the previous daemon died before its verdict; taking over"
            );
            Ok(())
        }
        other => Err(io::Error::other(format!(
            "unexpected verdict {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// False once `pid` has exited (a zombie has closed every descriptor and writes nothing).
///
/// The pid is the one the daemon saw in its own PID namespace. Where the successor runs in
/// another one (a new Kubernetes pod without `hostPID`), it names nothing or another process:
/// nothing, or this very process (both are often pid 1 of their container), reads as gone;
/// another live process reads as alive, and the successor then refuses to take over, which is
/// the safe side. Only the rare end of stream without a verdict depends on this.
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X') | None
        ),
    }
}

/// The state, the pid of the daemon that sent it, and whether it gives a verdict (step 6).
async fn receive_parts(stream: &mut UnixStream) -> io::Result<(FrozenDaemon, u32, bool)> {
    let mut header = vec![0u8; snapshot::HEADER_LEN];
    stream.read_exact(&mut header).await?;
    let total = snapshot::announced_len(&header).map_err(io::Error::other)?;
    let mut bytes = header;
    bytes.resize(total, 0);
    stream
        .read_exact(&mut bytes[snapshot::HEADER_LEN..])
        .await?;
    let envelope = snapshot::decode(&bytes).map_err(io::Error::other)?;
    let mut carried = Vec::with_capacity(envelope.descriptors);
    while carried.len() < envelope.descriptors {
        let batch = receive_batch(stream).await?;
        carried.extend(batch);
    }
    if carried.len() != envelope.descriptors {
        return Err(io::Error::other("more descriptors arrived than announced"));
    }
    let (from_pid, verdicts) = (envelope.snapshot.from_pid, envelope.snapshot.verdicts);
    let state =
        super::FrozenDaemon::resolve(envelope.snapshot, carried).map_err(io::Error::other)?;
    Ok((state, from_pid, verdicts))
}

async fn receive_batch(stream: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
    loop {
        stream.readable().await?;
        let mut count = [0u8; 4];
        let received = stream.try_io(Interest::READABLE, || {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = recvmsg(
                stream,
                &mut [IoSliceMut::new(&mut count)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let fds: Vec<OwnedFd> = control
                .drain()
                .filter_map(|m| match m {
                    RecvAncillaryMessage::ScmRights(fds) => Some(fds),
                    _ => None,
                })
                .flatten()
                .collect();
            Ok((got.bytes, got.flags, fds))
        });
        let (bytes, flags, fds) = match received {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(io::Error::other("descriptors were truncated in transit"));
        }
        if bytes != 4 || u32::from_le_bytes(count) as usize != fds.len() {
            return Err(io::Error::other(format!(
                "bad descriptor batch: {bytes} count bytes, {} descriptors",
                fds.len()
            )));
        }
        return Ok(fds);
    }
}
