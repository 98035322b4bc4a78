//! The console actor: one task per console, owning every resource of it.
//!
//! See the parent module for the backpressure rules. The loop waits on: commands, a QEMU
//! connection on the guest socket, a raw client on the client socket, guest output, the guest
//! becoming writable (only while a piece of input is being written), the caller of that piece
//! going away, and client input (always: a piece that cannot be written at once is answered at
//! once, so nothing waits in the channel). While a live migration's import runs into the console
//! (docs/design.md, "Live migration"), guest output is not read: only its first waiting byte is
//! noticed (it starts the switchover deadline), and imported bytes reach the clients instead.

use super::clients::{self, ClientQueue, Event, Offer};
use super::mux;
use super::Protocol;
use super::{AttachRequest, Command, ConsoleHandle, ConsoleSettings, Input, Mode, NO_WRITER};
use super::{ConsoleError, Result};
use crate::log_owner::{Attached, Figures, ImportOver, ImportStep, LogCommand, LogOwner};
use crate::logfile::index::EventKind;
use crate::migration::Moved;
use crate::upgrade::FrozenConsole;
use bytes::{Buf, Bytes};
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::sync::atomic::Ordering::Relaxed;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

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
    remote: bool,
}

/// The one piece of input being written to the guest.
struct Writing {
    /// Whose it is; `None` for input carried over an upgrade from an older image (nobody
    /// waits for it, it is written as before).
    client: Option<u64>,
    /// What the guest's socket has not taken yet (wire bytes).
    data: Bytes,
    /// The caller's bytes the piece stands for (what its reply counts).
    counted: usize,
    /// A mux console wrote the first byte of a two-byte sequence (`Ctrl-A Ctrl-A`, `Ctrl-A b`)
    /// last: the next byte written must be its second, even if the piece is discarded.
    half: bool,
    /// The caller waiting for the piece; closed when it went away.
    reply: Option<oneshot::Sender<Result<usize>>>,
}

impl Writing {
    fn abandoned(&self) -> bool {
        self.reply.as_ref().is_some_and(|r| r.is_closed())
    }

    /// Only the second byte of a pair whose input was discarded (owned by nobody).
    fn completes_pair(&self) -> bool {
        self.client.is_none() && self.half
    }
}

/// Most bytes read from a replaced guest connection: far above any socket send buffer (the
/// kernel's bound), so only a broken kernel could reach it.
const MAX_DRAIN: usize = 64 << 20;

pub(super) struct ConsoleActor {
    handle: ConsoleHandle,
    /// The log, its counters and offset publisher (the part every stream actor has).
    owner: LogOwner,
    guest_listener: UnixListener,
    client_listener: UnixListener,
    guest: Option<UnixStream>,
    /// The piece of input being written (module doc of `console`: nothing else is queued).
    writing: Option<Writing>,
    /// Input is in QEMU's mux framing ([`mux`]).
    mux: bool,
    /// Resolves once the keeper holds a new guest connection ([`crate::keeper::flushed`]): it
    /// is not read before, so a crash in between cannot lose what QEMU sent on it.
    held: Option<tokio::sync::oneshot::Receiver<()>>,
    clients: BTreeMap<u64, Client>,
    writer: Option<u64>,
    next_id: u64,
    settings: ConsoleSettings,
}

impl ConsoleActor {
    /// The actor of `handle`'s console; its caller spawns [`ConsoleActor::run`].
    pub(super) fn new(
        handle: ConsoleHandle,
        owner: LogOwner,
        guest_listener: UnixListener,
        client_listener: UnixListener,
        guest: Option<UnixStream>,
        pending_input: Vec<u8>,
        settings: ConsoleSettings,
    ) -> Self {
        let mux = handle.protocol == Protocol::Mux;
        Self {
            handle,
            owner,
            guest_listener,
            client_listener,
            guest,
            writing: (!pending_input.is_empty()).then(|| Writing {
                client: None,
                counted: 0,
                data: pending_input.into(),
                half: false,
                reply: None,
            }),
            mux,
            held: None,
            clients: BTreeMap::new(),
            writer: None,
            next_id: 1,
            settings,
        }
    }

    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut input: mpsc::Receiver<Input>,
    ) {
        loop {
            let connected = self.guest.is_some();
            let want_write = connected && self.writing.is_some();
            // Not biased: a guest flooding output must not starve input or commands, and a
            // fast typist must not starve the guest's output.
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Log(LogCommand::Import(step, reply))) => {
                        let _ = reply.send(self.import(*step));
                    }
                    Some(Command::Log(command)) => {
                        let (clients, writer) = (&self.clients, self.writer);
                        let guest_connected = self.guest.is_some();
                        let answered = self.owner.answer(command, |figures| Figures {
                            attached: clients
                                .iter()
                                .map(|(id, client)| Attached {
                                    label: client.label.clone(),
                                    writer: writer == Some(*id),
                                })
                                .collect(),
                            guest_connected,
                            ..figures
                        });
                        if let Some(close) = answered {
                            self.close(close.reason(), close.removed(), close.moved_to());
                            close.done();
                            return;
                        }
                    }
                    Some(Command::Freeze(reply)) => {
                        if let Some(fds) = self.freeze() {
                            let _ = reply.send(fds);
                        }
                        return;
                    }
                    Some(Command::Detach(id)) => self.detach(id),
                    Some(command) => self.handle_command(command),
                    None => {
                        self.close("console handle dropped", false, None);
                        return;
                    }
                },
                accepted = self.guest_listener.accept() => match accepted {
                    Ok((stream, _)) => self.guest_connected(stream),
                    Err(e) => tracing::warn!(error = %e, "guest accept failed"),
                },
                accepted = self.client_listener.accept() => match accepted {
                    Ok((stream, _)) => super::raw::spawn(self.handle.clone(), stream, self.settings.input_rate),
                    Err(e) => tracing::warn!(error = %e, "client accept failed"),
                },
                _ = keeper_holds(&mut self.held) => self.held = None,
                () = crate::pipe::switchover(self.owner.hold_deadline()) => {
                    self.end_import("the switchover timeout passed before the source's stream was done; the source's later bytes are not here");
                }
                // An import holds the guest's output back until it ends (docs/design.md, "Live
                // migration"): what the guest sends meanwhile waits in its socket.
                readable = readable(&self.guest), if self.held.is_none() && (!self.owner.holding() || self.owner.awaiting_output()) => match readable {
                    Ok(()) if self.owner.holding() => self.owner.output_waiting(),
                    Ok(()) => self.read_guest(),
                    Err(_) => self.guest_disconnected("guest socket error"),
                },
                writable = writable(&self.guest), if want_write => match writable {
                    Ok(()) => self.write_guest(),
                    Err(_) => self.guest_disconnected("guest socket error"),
                },
                () = abandoned(&mut self.writing) => self.drop_writing(None),
                received = input.recv() => {
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
            Command::EndClients(reason, done) => {
                self.drop_writing(Some(ConsoleError::ClientsEnded {
                    console: self.handle.name.clone(),
                    reason: reason.clone(),
                }));
                self.broadcast(Event::Closed {
                    reason,
                    removed: false,
                    moved: None,
                });
                self.clients.clear();
                self.set_writer(None, "", false);
                self.count_clients();
                let _ = done.send(());
            }
            Command::Log(_) | Command::Freeze(_) | Command::Detach(_) => {
                unreachable!("handled by run")
            }
        }
    }

    fn attach(&mut self, request: AttachRequest) -> Result<(u64, clients::ClientReceiver)> {
        if self.clients.len() >= self.settings.max_clients {
            return Err(ConsoleError::LimitReached {
                limit: "limits.clients_per_console",
                value: self.settings.max_clients as u64,
            });
        }
        let share = super::remote_client_share(self.settings.max_clients);
        if request.remote && self.clients.values().filter(|c| c.remote).count() >= share {
            return Err(ConsoleError::LimitReached {
                limit: "limits.clients_per_console (the remote clients' share: a quarter stays for local clients)",
                value: share as u64,
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
                return Err(ConsoleError::WriterHeld {
                    console: self.handle.name.clone(),
                    holder: holder.clone(),
                })
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let (mut queue, receiver) = clients::queue(self.settings.client_queue);
        let replay = request.replay_bytes.min(self.settings.max_replay);
        let (start, history) = if replay > 0 {
            crate::logfile::read_tail(&self.owner.log.segments(), replay).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read replay");
                (self.owner.log.end_offset(), Vec::new())
            })
        } else {
            (self.owner.log.end_offset(), Vec::new())
        };
        queue.control(Event::Attached {
            offset: start,
            writer: becomes_writer,
            guest_connected: self.guest.is_some(),
            serial_break: self.mux,
        });
        // One allocation for the whole replay, shared by its chunks; a remote client's replay
        // keeps its memory place until the client has taken every chunk.
        let history = match request.replay_permit.clone() {
            Some(permit) => Bytes::from_owner(Replay {
                data: history,
                _permit: permit,
            }),
            None => Bytes::from(history),
        };
        let mut offset = start;
        let mut at = 0;
        while at < history.len() {
            let end = (at + READ_CHUNK).min(history.len());
            queue.control(Event::Output {
                offset,
                data: history.slice(at..end),
            });
            offset += (end - at) as u64;
            at = end;
        }
        if becomes_writer {
            if self.writer.is_some() && self.writing_of(self.writer) {
                self.drop_writing(Some(ConsoleError::LeaseTaken {
                    by: request.label.clone(),
                    console: self.handle.name.clone(),
                }));
            }
            if let Some(old) = self.writer.and_then(|old| self.clients.get_mut(&old)) {
                old.queue.control(Event::WriterRevoked {
                    reason: format!("{} took the writer lease", request.label),
                });
                tracing::info!(old = %old.label, new = %request.label, "writer lease taken over");
            }
            self.set_writer(Some(id), &request.label, holder.is_some());
        }
        tracing::info!(client = %request.label, writer = becomes_writer, offset = start, "client attached");
        self.clients.insert(
            id,
            Client {
                queue,
                label: request.label,
                remote: request.remote,
            },
        );
        self.count_clients();
        Ok((id, receiver))
    }

    fn detach(&mut self, id: u64) {
        if let Some(client) = self.clients.remove(&id) {
            tracing::info!(client = %client.label, "client detached");
        }
        if self.writer == Some(id) {
            self.set_writer(None, "", false);
        }
        if self.writing_of(Some(id)) {
            self.drop_writing(Some(ConsoleError::ClientLeft(self.handle.name.clone())));
        }
        self.count_clients();
    }

    /// Changes the writer lease, and what handles see of it; the time index records the new
    /// holder's `label` (empty: nobody), and whether it took the lease from another (`forced`).
    fn set_writer(&mut self, writer: Option<u64>, label: &str, forced: bool) {
        if self.writer != writer {
            let detail = if forced {
                format!("{label} (forced)")
            } else {
                label.to_owned()
            };
            self.owner.note_event(EventKind::WriterChanged, &detail);
        }
        self.writer = writer;
        self.handle
            .console
            .writer
            .store(writer.unwrap_or(NO_WRITER), Relaxed);
    }

    /// Whether the piece being written is client `client`'s.
    fn writing_of(&self, client: Option<u64>) -> bool {
        client.is_some() && self.writing.as_ref().is_some_and(|w| w.client == client)
    }

    /// Discards the piece being written (what the guest's socket took stays taken) and tells
    /// its caller `why`, if it is still waiting. A mux sequence half written is completed
    /// first (its second byte stays to be written, owned by nobody): cut, QEMU would take the
    /// next byte of input as one of its commands.
    fn drop_writing(&mut self, why: Option<ConsoleError>) {
        let Some(mut writing) = self.writing.take() else {
            return;
        };
        tracing::debug!(discarded = writing.data.len(), "input discarded");
        if writing.half && self.guest.is_some() && !writing.data.is_empty() {
            self.writing = Some(Writing {
                client: None,
                data: writing.data.split_to(1),
                counted: 0,
                half: true,
                reply: None,
            });
        }
        if let (Some(reply), Some(why)) = (writing.reply, why) {
            let _ = reply.send(Err(why));
        }
    }

    fn count_clients(&self) {
        let before = self
            .handle
            .console
            .clients
            .swap(self.clients.len() as u64, Relaxed);
        self.owner.metrics.clients.inc_by(
            crate::metrics::gauge_value(self.clients.len()) - crate::metrics::gauge_value(before),
        );
    }

    fn guest_connected(&mut self, stream: UnixStream) {
        if let Some(old) = self.guest.take() {
            tracing::warn!("a new guest connection replaces the current one");
            let why = "replaced by a new guest connection";
            self.drain(old, why);
            self.owner.note_event(EventKind::GuestDisconnected, why);
        }
        // While an import holds the output, the event comes after the imported bytes.
        if !self.owner.guest_arrived() {
            self.owner.note_event(EventKind::GuestConnected, "");
        }
        // Nothing of the old connection's input goes to the new one (the guest is taken, so
        // no half-written pair is kept for it).
        self.drop_writing(Some(ConsoleError::GuestReplaced(self.handle.name.clone())));
        // The keeper holds the new connection in place of the old one (crate::keeper).
        crate::keeper::hold(&self.held_as(crate::keeper::names::CONNECTION), {
            use std::os::fd::AsFd;
            stream.as_fd()
        });
        self.held = Some(crate::keeper::flushed());
        self.guest = Some(stream);
        self.handle.console.guest_connected.store(true, Relaxed);
        tracing::info!("guest connected");
        self.broadcast(Event::Guest { connected: true });
    }

    /// Logs everything `old` (a guest connection being given up) still holds, then closes it.
    /// Its reading side is shut down first: from then on the peer's writes fail (`EPIPE`)
    /// instead of being accepted and lost, so reading to the end gets exactly every byte the
    /// peer's `write` calls accepted, in order, without waiting (see the module doc of
    /// `console`). The read goes to the descriptor itself, not through the reactor's readiness,
    /// which may not have seen the last bytes yet.
    fn drain(&mut self, old: UnixStream, why: &str) {
        use std::io::Read;
        let mut old = match old.into_std() {
            Ok(old) => old,
            Err(e) => {
                tracing::warn!(error = %e, "cannot drain the old guest connection");
                return;
            }
        };
        if let Err(e) = old.shutdown(std::net::Shutdown::Read) {
            tracing::warn!(error = %e, "cannot shut down the old guest connection");
        }
        let mut drained = 0;
        READ_BUFFER.with_borrow_mut(|buffer| {
            while drained < MAX_DRAIN {
                match old.read(buffer) {
                    Ok(0) => break,
                    Ok(n) => {
                        drained += n;
                        self.guest_output(&buffer[..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // WouldBlock cannot happen once the reading side is shut down (the queue
                    // is read, then end of stream); any error ends the drain.
                    Err(_) => break,
                }
            }
        });
        tracing::info!(drained, why, "old guest connection drained and closed");
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
        self.drop_writing(Some(ConsoleError::GuestLeft {
            console: self.handle.name.clone(),
            why: why.to_string(),
        }));
        self.handle.console.guest_connected.store(false, Relaxed);
        self.owner.note_event(EventKind::GuestDisconnected, why);
        tracing::info!(why, "guest disconnected");
        self.broadcast(Event::Guest { connected: false });
    }

    /// Reads everything the guest has sent so far (QEMU writes one byte per write(), so a
    /// wake-up often finds several), then logs and forwards it as one chunk: coalescing without
    /// adding latency.
    fn read_guest(&mut self) {
        let Some(guest) = &self.guest else {
            return;
        };
        self.owner
            .counting_rotations(|log| log.rotate_if_full(std::os::fd::AsFd::as_fd(guest)));
        // A read never runs past the current file: the rotation comes before the next read,
        // not between a read and its write (docs/operations.md, "Crash guarantees").
        let room = self.owner.log.room();
        let ended = READ_BUFFER.with_borrow_mut(|buffer| {
            let guest = self.guest.as_ref().expect("checked above");
            let limit = buffer.len().min(room);
            let mut filled = 0;
            let mut ended = None;
            while filled < limit {
                match guest.try_read(&mut buffer[filled..limit]) {
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

    /// Logs `output`, then offers all of it to every client: bytes the log could not take
    /// (disk full) still reach live viewers, at the offsets history reports as a gap
    /// (docs/operations.md, "Durability").
    fn guest_output(&mut self, output: &[u8]) {
        let offset = self.owner.log.end_offset();
        let written = self.owner.counting_rotations(|log| log.log(output));
        self.owner.count_moved(written.logged, written.dropped);
        self.offer(offset, &Bytes::copy_from_slice(output));
    }

    /// Offers bytes logged at `offset` to every client.
    fn offer(&mut self, offset: u64, data: &Bytes) {
        let mut gone = Vec::new();
        for (id, client) in &mut self.clients {
            match client.queue.offer(offset, data) {
                Offer::Queued | Offer::Skipped(false) => {}
                Offer::Skipped(true) => {
                    self.owner.metrics.lagged_clients.inc();
                    tracing::debug!(client = %client.label, offset, "client lagging");
                }
                Offer::Gone => gone.push(*id),
            }
        }
        for id in gone {
            self.detach(id);
        }
    }

    /// Writes what the guest's socket takes of the piece being written; answers its caller
    /// once all of it is taken. A piece whose caller went away is discarded first, so none of
    /// it is written after the caller left.
    fn write_guest(&mut self) {
        if self.writing.as_ref().is_some_and(Writing::abandoned) {
            self.drop_writing(None);
        }
        let (Some(guest), Some(writing)) = (&self.guest, &mut self.writing) else {
            return;
        };
        match guest.try_write(&writing.data) {
            Ok(n) => {
                if self.mux {
                    writing.half = mux::ends_half(writing.half, &writing.data[..n]);
                }
                writing.data.advance(n);
                if writing.data.is_empty() {
                    let done = self.writing.take().expect("checked above");
                    if let Some(reply) = done.reply {
                        let _ = reply.send(Ok(done.counted));
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => self.guest_disconnected("write error"),
        }
    }

    fn take_input(&mut self, input: Input) {
        if self.writing.as_ref().is_some_and(Writing::abandoned) {
            self.drop_writing(None);
        }
        let refusal = if self.writer != Some(input.client) {
            Some(super::not_writer(&self.handle.name))
        } else if self.guest.is_none() {
            Some(ConsoleError::NoGuest(self.handle.name.clone()))
        } else if self.writing.as_ref().is_some_and(|w| !w.completes_pair()) {
            // Only a second call of the same writer at once gets here (its calls are otherwise
            // sequential): refused, so that nothing queues and order is the writer's.
            Some(ConsoleError::StillWriting(self.handle.name.clone()))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            let _ = input.reply.send(Err(refusal));
            return;
        }
        if input.data.is_empty() && self.writing.is_none() {
            let _ = input.reply.send(Ok(0));
            return;
        }
        // The second byte of a pair cut when earlier input was discarded goes first, with this
        // input, rather than refusing it.
        let (data, half) = match self.writing.take() {
            Some(rest) => ([&rest.data[..], &input.data[..]].concat().into(), rest.half),
            None => (input.data, false),
        };
        self.writing = Some(Writing {
            client: Some(input.client),
            data,
            counted: input.counted,
            half,
            reply: Some(input.reply),
        });
        // Write at once when we can; what remains waits for the socket to be writable.
        self.write_guest();
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

    /// Ends every client with "come back" and returns the sockets (still open,
    /// files still in place) and the input not yet written to the guest.
    fn freeze(mut self) -> Option<FrozenConsole> {
        // A caller's input ends with its call (the call ends now); only input carried from an
        // older image, which nobody waits for, is carried on.
        if self.writing.as_ref().is_some_and(|w| w.client.is_some()) {
            self.drop_writing(Some(ConsoleError::Upgrading));
        }
        self.broadcast(Event::Closed {
            reason: "conlogd is upgrading; reconnect and resume by offset".into(),
            removed: false,
            moved: None,
        });
        self.clients.clear();
        self.count_clients();
        self.owner
            .note_event(EventKind::DaemonStopped, "handed over to a new conlogd");
        // No fsync: the next image shares this host's page cache.
        let owned = |result: std::io::Result<std::os::fd::OwnedFd>| {
            result
                .map_err(|e| tracing::error!(error = %e, "cannot hand over a console socket"))
                .ok()
        };
        let guest_listener = owned(self.guest_listener.into_std().map(Into::into))?;
        let client_listener = owned(self.client_listener.into_std().map(Into::into))?;
        let guest_connection = self.guest.and_then(|g| owned(g.into_std().map(Into::into)));
        Some(FrozenConsole {
            guest_listener,
            client_listener,
            guest_connection,
            pending_input: self.writing.map(|w| w.data.to_vec()).unwrap_or_default(),
        })
    }

    /// Applies an import step; imported bytes reach the attached clients like guest output.
    fn import(&mut self, step: ImportStep) -> std::result::Result<u64, ImportOver> {
        let ending = matches!(step, ImportStep::End { .. });
        let pending = self
            .owner
            .hold
            .as_ref()
            .is_some_and(|h| h.connected_pending);
        if let Some((offset, data)) = self.owner.import(step)? {
            self.offer(offset, &data);
        }
        if ending && pending && self.guest.is_some() {
            self.owner.note_event(EventKind::GuestConnected, "");
        }
        Ok(self.owner.log.end_offset())
    }

    /// Ends the import now (switchover timeout, close): the guest's output is logged from here.
    fn end_import(&mut self, detail: &str) {
        if self.owner.end_import(detail) && self.guest.is_some() {
            self.owner.note_event(EventKind::GuestConnected, "");
        }
    }

    fn close(&mut self, reason: &str, removed: bool, moved_to: Option<&str>) {
        self.drop_writing(Some(ConsoleError::ClosedWhileWriting {
            console: self.handle.name.clone(),
            reason: reason.to_owned(),
        }));
        // What the guest sent during an import comes after the imported bytes.
        if self.owner.holding() {
            self.end_import("the console closed during the import");
        }
        // Log what the guest already sent, so nothing it wrote before the close is lost.
        if let Some(guest) = self.guest.take() {
            self.drain(guest, "console closing");
            self.owner
                .note_event(EventKind::GuestDisconnected, "console closing");
        }
        let moved = moved_to.map(|to| {
            let offset = self.owner.log.end_offset();
            self.owner.note_event(
                EventKind::MigratedOut,
                &format!("to {to} at offset {offset}"),
            );
            Moved {
                to: to.to_owned(),
                offset,
            }
        });
        self.broadcast(Event::Closed {
            reason: reason.to_owned(),
            removed,
            moved,
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
        self.owner.note_event(EventKind::DaemonStopped, reason);
        self.owner.checkpoint();
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

/// Resolves when the caller of the piece being written went away.
async fn abandoned(writing: &mut Option<Writing>) {
    match writing.as_mut().and_then(|w| w.reply.as_mut()) {
        Some(reply) => reply.closed().await,
        None => std::future::pending().await,
    }
}

async fn writable(guest: &Option<UnixStream>) -> std::io::Result<()> {
    match guest {
        Some(stream) => stream.writable().await,
        None => std::future::pending().await,
    }
}

/// A replay's bytes and the memory place they hold (`limits.remote_replay_bytes`).
struct Replay {
    data: Vec<u8>,
    _permit: std::sync::Arc<tokio::sync::OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Replay {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}
