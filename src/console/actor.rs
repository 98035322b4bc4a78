//! The console actor: one task per console, owning every resource of it.
//!
//! See the parent module for the backpressure rules. The loop waits on: commands, a QEMU
//! connection on the guest socket, a raw client on the client socket, guest output, the guest
//! becoming writable (only while input is pending) and client input (only while there is room
//! for it).

use super::clients::{self, ClientQueue, Event, Offer};
use super::{
    AttachRequest, Command, ConsoleHandle, ConsoleSettings, Input, Mode, MAX_PENDING_INPUT,
};
use crate::error::{Error, Result};
use crate::logfile::LogFile;
use crate::metrics::Metrics;
use crate::stream::{Figures, OffsetPublisher};
use crate::upgrade::ConsoleFds;
use bytes::{Buf, Bytes, BytesMut};
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// Guest output read at once.
const READ_CHUNK: usize = 64 << 10;

thread_local! {
    /// The read buffer of every console actor running on this thread: actors read and forward
    /// a chunk without awaiting in between, so one buffer per thread serves them all (a buffer
    /// per console would cost 64 KiB per guest at rest).
    static READ_BUFFER: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

struct Client {
    queue: ClientQueue,
    label: String,
}

pub(super) struct ConsoleActor {
    handle: ConsoleHandle,
    log: LogFile,
    publisher: OffsetPublisher,
    guest_listener: UnixListener,
    client_listener: UnixListener,
    guest: Option<UnixStream>,
    /// Resolves once the keeper holds a new guest connection ([`crate::keeper::flushed`]): it
    /// is not read before, so a crash in between cannot lose what QEMU sent on it.
    held: Option<tokio::sync::oneshot::Receiver<()>>,
    to_guest: BytesMut,
    clients: BTreeMap<u64, Client>,
    writer: Option<u64>,
    next_id: u64,
    settings: ConsoleSettings,
    metrics: Arc<Metrics>,
}

impl ConsoleActor {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        handle: ConsoleHandle,
        log: LogFile,
        publisher: OffsetPublisher,
        guest_listener: UnixListener,
        client_listener: UnixListener,
        guest: Option<UnixStream>,
        pending_input: Vec<u8>,
        settings: ConsoleSettings,
        metrics: Arc<Metrics>,
        commands: mpsc::Receiver<Command>,
        input: mpsc::Receiver<Input>,
    ) {
        let actor = Self {
            handle,
            log,
            publisher,
            guest_listener,
            client_listener,
            guest,
            held: None,
            to_guest: BytesMut::from(&pending_input[..]),
            clients: BTreeMap::new(),
            writer: None,
            next_id: 1,
            settings,
            metrics,
        };
        tokio::spawn(actor.run(commands, input));
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut input: mpsc::Receiver<Input>,
    ) {
        loop {
            let connected = self.guest.is_some();
            let want_input = self.to_guest.len() < MAX_PENDING_INPUT;
            let want_write = connected && !self.to_guest.is_empty();
            // Not biased: a guest flooding output must not starve input or commands, and a
            // fast typist must not starve the guest's output.
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Close { reason, removed, done }) => {
                        self.close(&reason, removed);
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Freeze(reply)) => {
                        if let Some(fds) = self.freeze() {
                            let _ = reply.send(fds);
                        }
                        return;
                    }
                    Some(Command::Detach(id)) => {
                        // What the client typed before it left (already queued: its input is
                        // sent before its detach) still goes to the guest.
                        while let Ok(received) = input.try_recv() {
                            self.take_input(received);
                        }
                        self.detach(id);
                    }
                    Some(command) => self.handle_command(command),
                    None => {
                        self.close("console handle dropped", false);
                        return;
                    }
                },
                accepted = self.guest_listener.accept() => match accepted {
                    Ok((stream, _)) => self.guest_connected(stream),
                    Err(e) => tracing::warn!(console = %self.handle.name, error = %e, "guest accept failed"),
                },
                accepted = self.client_listener.accept() => match accepted {
                    Ok((stream, _)) => super::raw::spawn(self.handle.clone(), stream, self.settings.input_rate),
                    Err(e) => tracing::warn!(console = %self.handle.name, error = %e, "client accept failed"),
                },
                _ = keeper_holds(&mut self.held) => self.held = None,
                readable = readable(&self.guest), if self.held.is_none() => match readable {
                    Ok(()) => self.read_guest(),
                    Err(_) => self.guest_disconnected("guest socket error"),
                },
                writable = writable(&self.guest), if want_write => match writable {
                    Ok(()) => self.write_guest(),
                    Err(_) => self.guest_disconnected("guest socket error"),
                },
                received = input.recv(), if want_input => {
                    if let Some(received) = received {
                        self.take_input(received);
                    }
                },
            }
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Attach(request, reply) => {
                let _ = reply.send(self.attach(request));
            }
            Command::SetLimits(limits, reply) => {
                let before = self.log.rotations();
                let result = self.log.set_limits(limits);
                self.count_rotations(before);
                let _ = reply.send(result);
            }
            Command::Figures(reply) => {
                let _ = reply.send(Figures {
                    clients: self.clients.len() as u64,
                    guest_connected: self.guest.is_some(),
                    ..Figures::of(&self.log, &self.handle.stats)
                });
            }
            Command::OpenSegments(from, reply) => {
                let _ = reply.send(self.log.open_segments(from));
            }
            Command::EndClients(reason, done) => {
                self.broadcast(Event::Closed {
                    reason,
                    removed: false,
                });
                self.clients.clear();
                self.writer = None;
                self.count_clients();
                let _ = done.send(());
            }
            Command::Close { .. } | Command::Freeze(_) | Command::Detach(_) => {
                unreachable!("handled by run")
            }
        }
    }

    fn attach(&mut self, request: AttachRequest) -> Result<(u64, clients::ClientReceiver)> {
        if self.clients.len() >= self.settings.max_clients {
            return Err(Error::LimitReached {
                limit: "limits.clients_per_console",
                value: self.settings.max_clients as u64,
            });
        }
        let holder = self
            .writer
            .and_then(|id| self.clients.get(&id))
            .map(|c| c.label.clone());
        let becomes_writer = match (request.mode, &holder) {
            (Mode::ReadOnly, _) => false,
            (Mode::WriterIfFree, holder) => holder.is_none(),
            (Mode::ReadWrite, None) => true,
            (Mode::ReadWrite, Some(_)) if request.force => true,
            (Mode::ReadWrite, Some(holder)) => {
                return Err(Error::FailedPrecondition(format!(
                "Console {} has a writer ({holder}); attach READ_ONLY, or set force to take over",
                self.handle.name
            )))
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let (mut queue, receiver) = clients::queue(self.settings.client_queue);
        let replay = request.replay_bytes.min(self.settings.max_replay);
        let (start, history) = if replay > 0 {
            crate::history::read_tail(&self.log.segments(), replay).unwrap_or_else(|e| {
                tracing::warn!(console = %self.handle.name, error = %e, "cannot read replay");
                (self.log.end_offset(), Vec::new())
            })
        } else {
            (self.log.end_offset(), Vec::new())
        };
        queue.control(Event::Attached {
            offset: start,
            writer: becomes_writer,
            guest_connected: self.guest.is_some(),
        });
        let mut offset = start;
        for chunk in history.chunks(READ_CHUNK) {
            queue.control(Event::Output {
                offset,
                data: Bytes::copy_from_slice(chunk),
            });
            offset += chunk.len() as u64;
        }
        if becomes_writer {
            if let Some(old) = self.writer.and_then(|old| self.clients.get_mut(&old)) {
                old.queue.control(Event::WriterRevoked {
                    reason: format!("{} took the writer lease", request.label),
                });
                tracing::info!(console = %self.handle.name, old = %old.label, new = %request.label, "writer lease taken over");
            }
            self.writer = Some(id);
        }
        tracing::info!(console = %self.handle.name, client = %request.label, writer = becomes_writer, offset = start, "client attached");
        self.clients.insert(
            id,
            Client {
                queue,
                label: request.label,
            },
        );
        self.count_clients();
        Ok((id, receiver))
    }

    fn detach(&mut self, id: u64) {
        if let Some(client) = self.clients.remove(&id) {
            tracing::info!(console = %self.handle.name, client = %client.label, "client detached");
        }
        if self.writer == Some(id) {
            self.writer = None;
        }
        self.count_clients();
    }

    fn count_clients(&self) {
        let before = self
            .handle
            .console
            .clients
            .swap(self.clients.len() as u64, Relaxed);
        self.metrics
            .clients
            .inc_by(self.clients.len() as i64 - before as i64);
    }

    fn guest_connected(&mut self, stream: UnixStream) {
        if self.guest.is_some() {
            tracing::warn!(console = %self.handle.name, "a new guest connection replaces the current one");
        }
        // The keeper holds the new connection in place of the old one (crate::keeper).
        crate::keeper::hold(&self.held_as(crate::keeper::names::CONNECTION), {
            use std::os::fd::AsFd;
            stream.as_fd()
        });
        self.held = Some(crate::keeper::flushed());
        self.guest = Some(stream);
        self.to_guest.clear();
        self.handle.console.guest_connected.store(true, Relaxed);
        tracing::info!(console = %self.handle.name, "guest connected");
        self.broadcast(Event::Guest { connected: true });
    }

    /// The keeper's name of this console's `part` ([`crate::keeper::names::console`]).
    fn held_as(&self, part: &str) -> String {
        let (guest, device) = self.handle.guest_and_device();
        crate::keeper::names::console(guest, device, part)
    }

    fn guest_disconnected(&mut self, why: &str) {
        crate::keeper::release(&self.held_as(crate::keeper::names::CONNECTION));
        self.held = None;
        self.guest = None;
        self.to_guest.clear();
        self.handle.console.guest_connected.store(false, Relaxed);
        tracing::info!(console = %self.handle.name, why, "guest disconnected");
        self.broadcast(Event::Guest { connected: false });
    }

    /// Reads everything the guest has sent so far (QEMU writes one byte per write(), so a
    /// wake-up often finds several), then logs and forwards it as one chunk: coalescing without
    /// adding latency.
    fn read_guest(&mut self) {
        if self.guest.is_none() {
            return;
        }
        let ended = READ_BUFFER.with_borrow_mut(|buffer| {
            let guest = self.guest.as_ref().expect("checked above");
            let mut filled = 0;
            let mut ended = None;
            while filled < buffer.len() {
                match guest.try_read(&mut buffer[filled..]) {
                    Ok(0) => {
                        ended = Some("end of stream");
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        ended = Some("read error");
                        break;
                    }
                }
            }
            if filled > 0 {
                self.guest_output(&buffer[..filled]);
            }
            ended
        });
        if let Some(why) = ended {
            self.guest_disconnected(why);
        }
    }

    /// Logs `output`, then offers what was logged to every client.
    fn guest_output(&mut self, output: &[u8]) {
        let n = output.len();
        let offset = self.log.end_offset();
        let rotations = self.log.rotations();
        let result = self.log.append(output);
        self.count_rotations(rotations);
        let logged = (self.log.end_offset() - offset) as usize;
        if let Err(e) = result {
            tracing::debug!(console = %self.handle.name, error = %e, "console log write failed");
            self.handle
                .stats
                .record_dropped(self.log.path(), (n - logged) as u64, &self.metrics);
        }
        if logged == 0 {
            return;
        }
        self.handle.stats.record_logged(self.log.path());
        self.publisher.publish(self.log.end_offset());
        self.metrics.bytes_logged.inc_by(logged as u64);
        let data = Bytes::copy_from_slice(&output[..logged]);
        let mut gone = Vec::new();
        for (id, client) in &mut self.clients {
            match client.queue.offer(offset, &data) {
                Offer::Queued | Offer::Skipped(false) => {}
                Offer::Skipped(true) => {
                    self.metrics.lagged_clients.inc();
                    tracing::debug!(console = %self.handle.name, client = %client.label, offset, "client lagging");
                }
                Offer::Gone => gone.push(*id),
            }
        }
        for id in gone {
            self.detach(id);
        }
    }

    fn write_guest(&mut self) {
        let Some(guest) = &self.guest else { return };
        match guest.try_write(&self.to_guest) {
            Ok(n) => self.to_guest.advance(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => self.guest_disconnected("write error"),
        }
    }

    fn take_input(&mut self, input: Input) {
        let outcome = if self.writer != Some(input.client) {
            Err(Error::FailedPrecondition(format!(
                "This client does not hold the writer lease of console {}",
                self.handle.name
            )))
        } else if self.guest.is_none() {
            Err(Error::FailedPrecondition(format!(
                "No guest is connected to console {}; input dropped",
                self.handle.name
            )))
        } else {
            self.to_guest.extend_from_slice(&input.data);
            // Write at once when we can; what remains waits for the socket to be writable.
            self.write_guest();
            Ok(input.data.len())
        };
        if let Some(reply) = input.reply {
            let _ = reply.send(outcome);
        }
    }

    fn broadcast(&mut self, event: Event) {
        let gone: Vec<u64> = self
            .clients
            .iter_mut()
            .filter_map(|(id, client)| (!client.queue.control(event.clone())).then_some(*id))
            .collect();
        for id in gone {
            self.detach(id);
        }
    }

    fn count_rotations(&self, before: u64) {
        self.handle
            .stats
            .record_rotations(self.log.rotations() - before, &self.metrics);
    }

    /// Ends every client with "come back" and returns the sockets (still open,
    /// files still in place) and the input not yet written to the guest.
    fn freeze(mut self) -> Option<ConsoleFds> {
        self.broadcast(Event::Closed {
            reason: "conlogd is upgrading; reconnect and resume by offset".into(),
            removed: false,
        });
        self.clients.clear();
        self.count_clients();
        // No fsync: the next image shares this host's page cache.
        let owned = |result: std::io::Result<std::os::fd::OwnedFd>| {
            result
                .map_err(|e| tracing::error!(console = %self.handle.name, error = %e, "cannot hand over a console socket"))
                .ok()
        };
        let guest_listener = owned(self.guest_listener.into_std().map(Into::into))?;
        let client_listener = owned(self.client_listener.into_std().map(Into::into))?;
        let guest_connection = self.guest.and_then(|g| owned(g.into_std().map(Into::into)));
        Some(ConsoleFds {
            guest_listener,
            client_listener,
            guest_connection,
            pending_input: self.to_guest.to_vec(),
        })
    }

    fn close(&mut self, reason: &str, removed: bool) {
        // Read what the guest already sent, so nothing it wrote before the close is lost.
        READ_BUFFER.with_borrow_mut(|buffer| {
            while let Some(Ok(n)) = self.guest.as_ref().map(|g| g.try_read(buffer)) {
                if n == 0 {
                    break;
                }
                self.guest_output(&buffer[..n]);
            }
        });
        self.broadcast(Event::Closed {
            reason: reason.to_owned(),
            removed,
        });
        self.clients.clear();
        self.count_clients();
        self.handle.console.guest_connected.store(false, Relaxed);
        use crate::keeper::names::{CLIENT_LISTENER, CONNECTION, GUEST_LISTENER};
        for part in [CONNECTION, GUEST_LISTENER, CLIENT_LISTENER] {
            crate::keeper::release(&self.held_as(part));
        }
        for path in [
            &self.handle.paths.guest_socket,
            &self.handle.paths.client_socket,
        ] {
            let _ = std::fs::remove_file(path);
        }
        if let Some(dir) = self.handle.paths.guest_socket.parent() {
            let _ = std::fs::remove_dir(dir);
        }
        if let Err(e) = self.log.checkpoint() {
            tracing::warn!(console = %self.handle.name, error = %e, "cannot record the console log position");
        }
    }
}

/// Resolves when the keeper holds the new guest connection; never while there is none.
async fn keeper_holds(held: &mut Option<tokio::sync::oneshot::Receiver<()>>) {
    match held {
        Some(receiver) => {
            let _ = receiver.await;
        }
        None => std::future::pending().await,
    }
}

async fn readable(guest: &Option<UnixStream>) -> std::io::Result<()> {
    match guest {
        Some(stream) => stream.readable().await,
        None => std::future::pending().await,
    }
}

async fn writable(guest: &Option<UnixStream>) -> std::io::Result<()> {
    match guest {
        Some(stream) => stream.writable().await,
        None => std::future::pending().await,
    }
}
