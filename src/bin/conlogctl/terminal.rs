//! `conlogctl console`: an interactive console session over `AttachConsole`, kept across
//! upgrades, takeovers and daemon restarts.
//!
//! With a terminal on stdin it switches the terminal to raw mode (restored on every exit path
//! by a guard) and forwards keystrokes byte for byte, except `Ctrl-]` and the key after it:
//! `b` sends a serial BREAK (a magic SysRq key follows; only consoles created with the mux
//! protocol carry one, as the `attached` reply says), any other key leaves. With a pipe on stdin
//! it sends the pipe's bytes, keeps printing output until a short drain after end of input, and
//! exits. conlog's own notices go to stderr.
//!
//! **Replay and live.** conlogctl attaches with `replay_bytes = 0`: the `attached` reply's
//! offset is then exactly the first live byte. The replay (the `--replay` bytes before it) is
//! read with `ReadHistory` up to that offset, and so are holes (a `lagged` range, output printed
//! while reconnecting). Replayed and hole bytes go through
//! [`conlog::terminal_safety::QueryFilter`] (sequences that make a terminal answer are dropped,
//! so the operator's terminal never types answers into the guest); live output frames are
//! written unchanged, so a query the guest prints now is answered as on a serial line.
//!
//! **Reconnecting.** When the connection is lost (`UNAVAILABLE` on an upgrade or takeover, a
//! transport error on a crash) conlogctl prints one notice on stderr and attaches again with a
//! bounded backoff (100 ms doubling to 2 s, giving up after [`RECONNECT_FOR`] without success),
//! re-taking the writer lease if it held it, and shows every byte once: from the offset it had
//! reached, holes filled from history. Keystrokes typed meanwhile are sent after reconnecting.
//!
//! **Moves.** When the guest moved to another node (the moved status, docs/operations.md,
//! "When a guest moves"), conlogctl prints one notice, attaches on the new node with the same
//! token and TLS settings, and goes on from the offset it had reached (output below it is
//! dropped; what the new node's first byte is above it is filled from its history, which
//! reports a gap if it lacks it). A writer lease held is taken on the new node with force (it
//! is this session's lease, carried over). At most [`conlog::client::MAX_MOVES`] moves per
//! run; a loop (two nodes naming each other at one offset) is an error naming both.

use crate::{Exit, Failure};
use anyhow::{Context, Result};
use conlog::proto::{self, attach, client_frame, console_client::ConsoleClient, server_frame};
use conlog::terminal_safety::QueryFilter;
use futures::future::BoxFuture;
use std::io::{IsTerminal, Read, Write};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// `Ctrl-]`, the escape key (as in telnet and virsh console): the key after it is a command.
const ESCAPE: u8 = 0x1d;
/// After [`ESCAPE`]: send a serial BREAK.
const BREAK_KEY: u8 = b'b';

/// What keys typed on the terminal mean.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    /// Bytes for the guest.
    Input(Vec<u8>),
    /// `Ctrl-]` then `b`.
    Break,
    /// `Ctrl-]` then any other key.
    Leave,
    /// `Ctrl-]` was the last key typed: the next one says what it means.
    Escape,
}

/// Splits what the terminal sent into keys; `escaped` carries a `Ctrl-]` typed last across
/// reads.
fn keys(escaped: &mut bool, bytes: &[u8]) -> Vec<Key> {
    let mut keys = Vec::new();
    let mut input = Vec::new();
    for &byte in bytes {
        if std::mem::take(escaped) {
            if !input.is_empty() {
                keys.push(Key::Input(std::mem::take(&mut input)));
            }
            if byte == BREAK_KEY {
                keys.push(Key::Break);
            } else {
                keys.push(Key::Leave);
                return keys;
            }
        } else if byte == ESCAPE {
            *escaped = true;
        } else {
            input.push(byte);
        }
    }
    if !input.is_empty() {
        keys.push(Key::Input(input));
    }
    if *escaped {
        keys.push(Key::Escape);
    }
    keys
}

/// How long conlogctl keeps trying to reconnect before giving up.
pub const RECONNECT_FOR: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Options of a console session.
pub struct Options {
    pub guest: String,
    pub device: String,
    pub read_only: bool,
    pub force: bool,
    pub replay: u64,
    pub drain: Duration,
}

/// Makes a new channel to the daemon (for each connection attempt): to the given server URL
/// (where the guest moved to), or the command line's.
pub type Connect<'a> = Box<dyn Fn(Option<String>) -> BoxFuture<'a, Result<Channel>> + 'a>;

/// Puts the terminal in raw mode and restores it when dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> Result<Self> {
        let stdin = rustix::stdio::stdin();
        let saved = rustix::termios::tcgetattr(stdin).context("cannot read terminal settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("cannot switch the terminal to raw mode")?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            rustix::stdio::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

fn notice(interactive: bool, text: &str) {
    let newline = if interactive { "\r\n" } else { "\n" };
    eprint!("{newline}[conlog: {text}]{newline}");
}

/// Whether a status means the connection (not the request) failed: worth reconnecting.
pub fn is_lost(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted
    )
}

/// Where the session is: the next offset to show, and whether it held the writer lease.
struct Progress {
    next: Option<u64>,
    writer: bool,
    /// The console can carry a serial BREAK (from its `attached` reply).
    serial_break: bool,
    /// An `attached` reply came (the first attach's mode and force are used until then).
    attached: bool,
    /// The guest moved since the last attach: a lease held is re-taken with force.
    moved: bool,
}

/// How one connection ended.
enum End {
    /// The user left (Ctrl-], or end of piped input and drain).
    Left,
    /// The connection was lost: reconnect.
    Lost(String),
    /// The guest moved to another node: attach there.
    Moved(conlog::client::Moved),
}

/// Runs the session until `Ctrl-]`, end of input plus drain, or a failure.
pub async fn run(
    connect: Connect<'_>,
    route: conlog::client::Route,
    token: Option<String>,
    options: Options,
) -> Result<()> {
    let interactive = std::io::stdin().is_terminal();
    // Stdin is read on a plain thread (blocking reads); bytes arrive here and wait across
    // reconnections.
    let (input_tx, mut input_rx) = mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buffer = [0u8; 4096];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input_tx.blocking_send(buffer[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut session = Session {
        interactive,
        token,
        options,
        progress: Progress {
            next: None,
            writer: false,
            serial_break: false,
            attached: false,
            moved: false,
        },
        route,
        escaped: false,
        input_open: true,
        drain_until: None,
    };
    let mut raw = None;
    let mut first = true;
    loop {
        let channel = match connect(session.route.server().map(str::to_owned)).await {
            Ok(channel) => channel,
            Err(e) if first => return Err(e),
            Err(_) => {
                session.reconnect_wait(&connect).await?;
                continue;
            }
        };
        let end = session
            .attach(channel, &mut input_rx, first, &mut raw)
            .await;
        first = false;
        match end? {
            End::Left => {
                if interactive {
                    // The host prompt starts on a fresh line.
                    drop(raw);
                    eprintln!();
                }
                return Ok(());
            }
            End::Moved(moved) => {
                session
                    .route
                    .follow(&moved)
                    .map_err(|e| Failure::new(Exit::Refused, e.to_string()))?;
                session.progress.moved = true;
                notice(
                    interactive,
                    &format!("guest moved to {}; following", moved.to),
                );
            }
            End::Lost(why) => {
                notice(
                    interactive,
                    &format!("connection lost ({why}); reconnecting"),
                );
                session.reconnect_wait(&connect).await?;
            }
        }
    }
}

struct Session {
    interactive: bool,
    /// Where to connect: the node the guest is on.
    route: conlog::client::Route,
    token: Option<String>,
    options: Options,
    progress: Progress,
    input_open: bool,
    drain_until: Option<tokio::time::Instant>,
    /// `Ctrl-]` was typed last.
    escaped: bool,
}

impl Session {
    /// Waits with backoff until the daemon accepts connections again (a cheap probe: a new
    /// channel). Fails with [`Exit::Lost`] after [`RECONNECT_FOR`].
    async fn reconnect_wait(&mut self, connect: &Connect<'_>) -> Result<()> {
        let give_up = tokio::time::Instant::now() + RECONNECT_FOR;
        let mut backoff = FIRST_BACKOFF;
        loop {
            tokio::time::sleep(backoff).await;
            let why = match connect(self.route.server().map(str::to_owned)).await {
                Ok(_) => return Ok(()),
                Err(e) => crate::error_text(&e),
            };
            if tokio::time::Instant::now() >= give_up {
                return Err(Failure::new(
                    Exit::Lost,
                    format!(
                        "connection to conlogd lost and not back after {RECONNECT_FOR:?}: {why}"
                    ),
                )
                .into());
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One `AttachConsole` call: until the user leaves or the connection is lost.
    async fn attach(
        &mut self,
        channel: Channel,
        input_rx: &mut mpsc::Receiver<Vec<u8>>,
        first: bool,
        raw: &mut Option<RawMode>,
    ) -> Result<End> {
        let interactive = self.interactive;
        let options = &self.options;
        let mut client = ConsoleClient::new(channel);
        // A reconnect re-takes the lease if it was held (without force: a client that took it
        // meanwhile keeps it), else watches.
        // After a move, a held lease is taken back with force: it is this session's own.
        let (mode, force) = if !self.progress.attached {
            let mode = if options.read_only {
                attach::Mode::ReadOnly
            } else {
                attach::Mode::ReadWrite
            };
            (mode, options.force)
        } else if self.progress.writer {
            (attach::Mode::ReadWrite, self.progress.moved)
        } else {
            (attach::Mode::ReadOnly, false)
        };
        let (frames_tx, frames_rx) = mpsc::channel::<proto::ClientFrame>(16);
        frames_tx
            .send(proto::ClientFrame {
                frame: Some(client_frame::Frame::Attach(proto::Attach {
                    guest: options.guest.clone(),
                    device: options.device.clone(),
                    mode: mode.into(),
                    force,
                    replay_bytes: 0,
                })),
            })
            .await
            .expect("receiver alive");
        let call = client
            .attach_console(crate::with_token(
                tokio_stream::wrappers::ReceiverStream::new(frames_rx),
                &self.token,
            )?)
            .await;
        let mut output = match call {
            Ok(output) => output.into_inner(),
            Err(status) if conlog::client::moved_of(&status).is_some() => {
                return Ok(End::Moved(
                    conlog::client::moved_of(&status).expect("moved"),
                ))
            }
            Err(status) if !first && is_lost(&status) => {
                return Ok(End::Lost(status.message().to_string()))
            }
            Err(status) => return Err(crate::refused(status)),
        };
        if raw.is_none() && interactive {
            eprintln!(
                "[conlog: attached to {}/{}; Ctrl-] then q leaves, Ctrl-] then b sends a serial BREAK]",
                options.guest, options.device
            );
            *raw = Some(RawMode::enter()?);
        }
        let mut stdout = std::io::stdout().lock();
        let drain = tokio::time::sleep_until(
            self.drain_until
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365)),
        );
        tokio::pin!(drain);
        loop {
            tokio::select! {
                frame = output.message() => {
                    let frame = match frame {
                        Ok(Some(frame)) => frame,
                        Ok(None) => return Ok(End::Lost("the console call ended".into())),
                        Err(status) if conlog::client::moved_of(&status).is_some() => {
                            return Ok(End::Moved(conlog::client::moved_of(&status).expect("moved")))
                        }
                        Err(status) if is_lost(&status) => return Ok(End::Lost(status.message().to_string())),
                        Err(status) => return Err(crate::refused(status)),
                    };
                    match frame.frame {
                        Some(server_frame::Frame::Output(out)) => {
                            let next = self.progress.next.unwrap_or(out.offset);
                            let end = out.offset + out.data.len() as u64;
                            if next > out.offset && next < end {
                                // Below the chunk's length (checked above).
                                let skip = usize::try_from(next - out.offset).unwrap_or(out.data.len());
                                stdout.write_all(&out.data[skip..])?;
                            } else if next <= out.offset {
                                if next < out.offset {
                                    // A hole between frames: shown from history, filtered.
                                    self.fill(&mut client, next, out.offset, &mut stdout).await?;
                                }
                                stdout.write_all(&out.data)?;
                            }
                            stdout.flush()?;
                            self.progress.next = Some(end.max(next));
                        }
                        Some(server_frame::Frame::Attached(a)) => {
                            self.progress.writer = a.writer;
                            self.progress.attached = true;
                            self.progress.moved = false;
                            self.progress.serial_break = a.serial_break;
                            let from = match self.progress.next {
                                None => a.offset.saturating_sub(options.replay),
                                Some(next) => next,
                            };
                            if from < a.offset {
                                self.fill(&mut client, from, a.offset, &mut stdout).await?;
                            }
                            self.progress.next = Some(a.offset.max(from));
                            if !first {
                                notice(interactive, &format!("reconnected at offset {}", a.offset));
                            }
                            if !a.writer && mode == attach::Mode::ReadWrite {
                                notice(interactive, "watching only: another client holds the writer lease (use --force to take it)");
                            }
                            if first && !a.guest_connected {
                                notice(interactive, "the guest is not connected");
                            }
                        }
                        Some(server_frame::Frame::Lagged(l)) => {
                            // Fill what was skipped from history (filtered like a replay).
                            let from = self.progress.next.unwrap_or(l.from_offset).max(l.from_offset);
                            self.fill(&mut client, from, l.to_offset, &mut stdout).await?;
                            self.progress.next = Some(l.to_offset.max(from));
                        }
                        Some(server_frame::Frame::Guest(g)) => notice(
                            interactive,
                            if g.connected { "guest connected" } else { "guest disconnected" },
                        ),
                        Some(server_frame::Frame::WriterRevoked(r)) => {
                            self.progress.writer = false;
                            return Err(Failure::new(
                                Exit::Revoked,
                                format!("writer lease revoked: {} (attach again with --force to take it back)", r.reason),
                            ).into());
                        }
                        None => {}
                    }
                }
                bytes = input_rx.recv(), if self.input_open => match bytes {
                    Some(bytes) if !interactive => send_input(&frames_tx, &bytes, options.read_only).await,
                    Some(bytes) => {
                        for key in keys(&mut self.escaped, &bytes) {
                            match key {
                                Key::Input(bytes) => send_input(&frames_tx, &bytes, options.read_only).await,
                                Key::Escape => notice(interactive, "b: send a serial BREAK; any other key leaves"),
                                Key::Break if !self.progress.writer => notice(interactive, "watching only: a serial BREAK needs the writer lease (use --force to take it)"),
                                Key::Break if !self.progress.serial_break => notice(interactive, "this console cannot carry a serial BREAK: its guest socket is raw (create it with --mux and give QEMU's chardev mux=on; docs/consoles.md)"),
                                Key::Break => {
                                    let frame = proto::ClientFrame {
                                        frame: Some(client_frame::Frame::SerialBreak(proto::SerialBreak {})),
                                    };
                                    let _ = frames_tx.send(frame).await;
                                }
                                Key::Leave => {
                                    // Let the input frame go out before the call ends.
                                    drop(frames_tx);
                                    let _ = tokio::time::timeout(Duration::from_millis(200), output.message()).await;
                                    return Ok(End::Left);
                                }
                            }
                        }
                    }
                    None => {
                        self.input_open = false;
                        let until = tokio::time::Instant::now() + options.drain;
                        self.drain_until = Some(until);
                        drain.as_mut().reset(until);
                    }
                },
                _ = &mut drain => return Ok(End::Left),
            }
        }
    }

    /// Shows `from..to` from history, with terminal queries removed.
    async fn fill(
        &self,
        client: &mut ConsoleClient<Channel>,
        from: u64,
        to: u64,
        stdout: &mut std::io::StdoutLock<'_>,
    ) -> Result<()> {
        let request = proto::ReadHistoryRequest {
            guest: self.options.guest.clone(),
            stream: self.options.device.clone(),
            start: Some(proto::read_history_request::Start::FromOffset(from)),
            follow: false,
            limit_bytes: to - from,
            ..Default::default()
        };
        let mut chunks = match client
            .read_history(crate::with_token(request, &self.token)?)
            .await
        {
            Ok(chunks) => chunks.into_inner(),
            Err(status) => {
                notice(
                    self.interactive,
                    &format!("output {from}..{to} cannot be shown: {}", status.message()),
                );
                return Ok(());
            }
        };
        let mut filter = QueryFilter::new();
        let mut shown = Vec::new();
        loop {
            match chunks.message().await {
                Ok(Some(chunk)) => {
                    if let Some(gap) = chunk.gap {
                        notice(
                            self.interactive,
                            &format!(
                                "offsets {}..{} are no longer on disk",
                                gap.from_offset, gap.to_offset
                            ),
                        );
                    }
                    shown.clear();
                    filter.push(&chunk.data, &mut shown);
                    stdout.write_all(&shown)?;
                }
                Ok(None) => break,
                Err(status) => {
                    notice(
                        self.interactive,
                        &format!("output up to {to} cannot be shown: {}", status.message()),
                    );
                    break;
                }
            }
        }
        // A sequence cut at the live boundary is completed by live output, unfiltered.
        stdout.write_all(&filter.take_pending())?;
        stdout.flush()?;
        Ok(())
    }
}

async fn send_input(frames: &mpsc::Sender<proto::ClientFrame>, bytes: &[u8], read_only: bool) {
    if read_only || bytes.is_empty() {
        return;
    }
    let frame = proto::ClientFrame {
        frame: Some(client_frame::Frame::Input(proto::Input {
            data: bytes.to_vec().into(),
        })),
    };
    let _ = frames.send(frame).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_after_the_escape_key_are_commands_even_across_reads() {
        let mut escaped = false;
        assert_eq!(
            keys(&mut escaped, b"ls\x1db\x1dbx"),
            [
                Key::Input(b"ls".to_vec()),
                Key::Break,
                Key::Break,
                Key::Input(b"x".to_vec())
            ]
        );
        assert_eq!(
            keys(&mut escaped, b"ab\x1d"),
            [Key::Input(b"ab".to_vec()), Key::Escape]
        );
        assert!(escaped);
        assert_eq!(keys(&mut escaped, b"b\x1d"), [Key::Break, Key::Escape]);
        assert_eq!(keys(&mut escaped, b"qrest"), [Key::Leave]);
        assert!(!escaped);
        assert_eq!(
            keys(&mut escaped, b"a\x1d.b"),
            [Key::Input(b"a".to_vec()), Key::Leave]
        );
    }
}
