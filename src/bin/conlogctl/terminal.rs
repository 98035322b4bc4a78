//! `conlogctl console`: an interactive console session over `AttachConsole`.
//!
//! With a terminal on stdin it switches the terminal to raw mode (restored on every exit path
//! by a guard), forwards keystrokes byte for byte and leaves on `Ctrl-]`. With a pipe on stdin
//! it sends the pipe's bytes, keeps printing output until a short drain after end of input, and
//! exits. Output bytes go to stdout unchanged; conlog's own notices go to stderr.

use anyhow::{Context, Result};
use conlog::proto::{self, attach, client_frame, console_client::ConsoleClient, server_frame};
use std::io::{IsTerminal, Read, Write};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// `Ctrl-]`, the escape that ends an interactive session (as in telnet and virsh console).
const ESCAPE: u8 = 0x1d;

/// Options of a console session.
pub struct Options {
    pub guest: String,
    pub device: String,
    pub read_only: bool,
    pub force: bool,
    pub replay: u64,
    pub drain: Duration,
}

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

/// Runs the session until `Ctrl-]`, end of input plus drain, or the console closing.
pub async fn run(channel: Channel, token: Option<String>, options: Options) -> Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let mut client = ConsoleClient::new(channel);
    let (frames_tx, frames_rx) = mpsc::channel::<proto::ClientFrame>(16);
    let mode = if options.read_only {
        attach::Mode::ReadOnly
    } else {
        attach::Mode::ReadWrite
    };
    frames_tx
        .send(proto::ClientFrame {
            frame: Some(client_frame::Frame::Attach(proto::Attach {
                guest: options.guest.clone(),
                device: options.device.clone(),
                mode: mode.into(),
                force: options.force,
                replay_bytes: options.replay,
            })),
        })
        .await
        .expect("receiver alive");
    let mut output = client
        .attach_console(crate::with_token(
            tokio_stream::wrappers::ReceiverStream::new(frames_rx),
            &token,
        )?)
        .await
        .map_err(crate::status_error)?
        .into_inner();

    // Stdin is read on a plain thread (blocking reads); bytes arrive here.
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

    let _raw = if interactive {
        eprintln!(
            "[conlog: attached to {}/{}; Ctrl-] leaves]",
            options.guest, options.device
        );
        Some(RawMode::enter()?)
    } else {
        None
    };
    let mut stdout = std::io::stdout().lock();
    let mut input_open = true;
    let drain = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(drain);
    loop {
        tokio::select! {
            frame = output.message() => {
                let frame = match frame {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(status) => {
                        notice(interactive, &format!("console closed: {}", status.message()));
                        break;
                    }
                };
                match frame.frame {
                    Some(server_frame::Frame::Output(out)) => {
                        stdout.write_all(&out.data)?;
                        stdout.flush()?;
                    }
                    Some(server_frame::Frame::Attached(a)) => {
                        if !a.writer && !options.read_only {
                            notice(interactive, "watching only: another client holds the writer lease (use --force to take it)");
                        }
                        if !a.guest_connected {
                            notice(interactive, "the guest is not connected");
                        }
                    }
                    Some(server_frame::Frame::Lagged(l)) => notice(
                        interactive,
                        &format!("output {}..{} skipped (too slow); `conlogctl history --from {}` has it", l.from_offset, l.to_offset, l.from_offset),
                    ),
                    Some(server_frame::Frame::Guest(g)) => notice(
                        interactive,
                        if g.connected { "guest connected" } else { "guest disconnected" },
                    ),
                    Some(server_frame::Frame::WriterRevoked(r)) => notice(interactive, &format!("writer lease revoked: {}", r.reason)),
                    None => {}
                }
            }
            bytes = input_rx.recv(), if input_open => match bytes {
                Some(bytes) => {
                    let bytes = match interactive.then(|| bytes.iter().position(|b| *b == ESCAPE)).flatten() {
                        Some(at) => {
                            send_input(&frames_tx, &bytes[..at], options.read_only).await;
                            break;
                        }
                        None => bytes,
                    };
                    send_input(&frames_tx, &bytes, options.read_only).await;
                }
                None => {
                    input_open = false;
                    drain.as_mut().reset(tokio::time::Instant::now() + options.drain);
                }
            },
            _ = &mut drain => break,
        }
    }
    Ok(())
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
