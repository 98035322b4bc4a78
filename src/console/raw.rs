//! Raw clients of `client.sock`: bytes both ways, for `socat - UNIX-CONNECT:…` and `nc -U`.
//!
//! Each connection is a client of the console like any gRPC one: it takes the writer lease if
//! nobody holds it, else it watches. It receives guest output as raw bytes (no frames; gaps of a
//! lagging connection are simply skipped) and what it sends goes to the guest only while it
//! holds the lease. One task per connection, so a slow reader only ever waits on itself. Input
//! is read from the connection only while the guest takes it: one read (4 KiB) at a time is
//! being written, and it is withdrawn if the connection goes away first.

use super::pacing::InputPacer;
use super::{AttachRequest, ConsoleHandle, Event, Mode};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Serves one raw connection on its own task, in the span of the console's actor that accepted
/// it (so its events name the guest and stream).
pub(super) fn spawn(console: ConsoleHandle, stream: UnixStream, input_rate: u64) {
    let task = async move {
        let label = match stream.peer_cred() {
            Ok(cred) => format!(
                "client.sock pid {} uid {}",
                cred.pid().unwrap_or(-1),
                cred.uid()
            ),
            Err(_) => "client.sock".to_owned(),
        };
        let request = AttachRequest {
            mode: Mode::WriterIfFree,
            force: false,
            replay_bytes: 0,
            label: label.clone(),
            remote: false,
            replay_permit: None,
        };
        let mut attachment = match console.attach(request).await {
            Ok(attachment) => attachment,
            Err(e) => {
                let (_, mut write) = stream.into_split();
                let _ = write
                    .write_all(format!("conlogd: {e}\r\n").as_bytes())
                    .await;
                return;
            }
        };
        let (mut read, mut write) = stream.into_split();
        let mut hangup_check = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut buffer = vec![0u8; 4096];
        let mut pacer = InputPacer::new(input_rate);
        // After the peer shuts down its sending side it may still watch; keep writing to it.
        let mut reading = true;
        // The input being written to the guest: nothing more is read from the peer until the
        // guest took it (so a guest that does not read stops the peer, through its socket
        // buffer), and it is withdrawn if the peer goes away meanwhile.
        let mut writing: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
        loop {
            tokio::select! {
                event = attachment.events.recv() => match event {
                    Some(Event::Output { data, .. }) => {
                        if write.write_all(&data).await.is_err() {
                            break;
                        }
                    }
                    Some(Event::Closed { .. }) | None => break,
                    Some(_) => {}
                },
                // A half-closed peer is still a watcher, and a peer waiting for the guest to
                // take its input is not read: notice when it goes away entirely even if the
                // console is quiet.
                _ = hangup_check.tick(), if !reading || writing.is_some() => {
                    if peer_hung_up(write.as_ref()) {
                        break;
                    }
                },
                // Input from a client without the lease, or with no guest, is dropped (raw
                // clients have no way to be told).
                () = async { writing.as_mut().expect("guarded").await }, if writing.is_some() => {
                    writing = None;
                },
                // Over the input rate: stop reading (the peer sees a full socket) until allowed.
                _ = tokio::time::sleep_until(pacer.ready_at()), if reading && writing.is_none() && !pacer.is_ready() => {},
                n = read.read(&mut buffer), if reading && writing.is_none() && pacer.is_ready() => match n {
                    Ok(0) => reading = false,
                    Err(_) => break,
                    Ok(n) => {
                        pacer.record(n);
                        let console = console.clone();
                        let data = Bytes::copy_from_slice(&buffer[..n]);
                        let id = attachment.id;
                        writing = Some(Box::pin(async move {
                            let _ = console.write_input(id, data).await;
                        }));
                    }
                },
            }
        }
        tracing::debug!(client = %label, "raw client gone");
    };
    tokio::spawn(tracing::Instrument::in_current_span(task));
}

/// True when the peer has closed both directions (POLLHUP).
fn peer_hung_up(stream: &UnixStream) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(stream, PollFlags::empty())];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&zero)).is_ok() && fds[0].revents().contains(PollFlags::HUP)
}
