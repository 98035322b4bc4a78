//! The actor that owns one log-pipe stream: its pipes' read ends and, through its
//! [`LogOwner`], its log and counters.
//!
//! One task per stream; the rest of the daemon talks to it through [`PipeHandle`] (a bounded
//! command channel; the log commands every stream answers go through its embedded
//! [`LogHandle`]) and reads its counters from [`crate::log_owner::StreamStats`] (atomics, never
//! a lock). The actor never waits on anything but its pipes and its own file: guest → log is
//! lossless while the disk accepts writes; when the disk refuses (or a rotation cannot open its
//! new file), bytes are read out of the pipe anyway (so the guest never blocks), take their
//! offsets as a gap that history reports, and are counted as dropped (the count survives
//! restarts, crashes and upgrades: the log's position record keeps it).
//!
//! A stream created by a live migration's import (docs/design.md, "Live migration") does not
//! read its pipes until the import ends (its last step, or `migration.switchover_timeout` after
//! the first byte waiting): the imported bytes come first, and the guest waits at most that long.
//!
//! Several pipes may feed one stream (each `CreateLogPipe` adds one; a writer may also duplicate
//! its descriptor). Each `splice` moves at most what the pipe holds, and pipe writes of up to
//! `PIPE_BUF` bytes are atomic, so lines of different writers are not torn.
//!
//! This module never touches a console, a client or the registry; its task runs in a span
//! naming its guest and stream, so its events carry them.

use crate::log_owner::{ActorGone, Figures, ImportStep, LogCommand, LogError, LogHandle, LogOwner};
use crate::logfile::index::EventKind;
use crate::logfile::{LogFile, Moved};
use crate::metrics::Metrics;
use std::future::poll_fn;
use std::io::{self, ErrorKind};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;
use tokio::net::unix::pipe::Receiver;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

/// Bytes moved from one pipe before the actor looks at its commands and other pipes again.
const BUDGET_PER_WAKE: usize = 8 << 20;
/// Largest single splice.
const MOVE_MAX: usize = COPY_BUFFER_LEN;
/// Size of the copy buffer between pipe and file.
const COPY_BUFFER_LEN: usize = 128 << 10;

thread_local! {
    /// One copy buffer per runtime thread, not per stream: moves are synchronous inside a poll,
    /// so two actors never use it at once, and thousands of idle streams hold no buffer.
    static COPY_BUFFER: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; COPY_BUFFER_LEN].into_boxed_slice());
}

/// Moves bytes from `pipe` into `log` through this thread's copy buffer.
fn move_bytes(log: &mut LogFile, pipe: std::os::fd::BorrowedFd<'_>) -> io::Result<Moved> {
    COPY_BUFFER.with(|buffer| log.move_from_pipe(pipe, MOVE_MAX, &mut buffer.borrow_mut()))
}

/// What the actor is asked to do.
enum Command {
    AddPipe(OwnedFd, oneshot::Sender<io::Result<u64>>),
    /// What every stream answers (a close drains what the pipes hold, syncs, and stops).
    Log(LogCommand),
    /// Stop reading (unread bytes stay in the pipes), sync, and hand the pipes back.
    Freeze(oneshot::Sender<Vec<OwnedFd>>),
}

impl From<LogCommand> for Command {
    fn from(command: LogCommand) -> Self {
        Command::Log(command)
    }
}

/// A cheap, cloneable handle to a pipe stream's actor.
#[derive(Clone)]
pub struct PipeHandle {
    commands: mpsc::Sender<Command>,
    /// The log commands, counters and end offset every stream has.
    pub log: LogHandle,
}

impl PipeHandle {
    /// Starts the actor that owns `log`, the log of stream `stream` of `guest`; its pipes are
    /// held by the keeper under names starting with [`crate::keeper::names::pipe_prefix`].
    pub fn spawn(
        log: LogFile,
        metrics: std::sync::Arc<Metrics>,
        guest: &str,
        stream: &str,
    ) -> Self {
        let (commands, receiver) = mpsc::channel(16);
        let broken = log.was_open();
        let (owner, handle) = LogOwner::new(log, metrics, commands.clone());
        let actor = PipeActor {
            owner,
            broken,
            pipes: Vec::new(),
            held_as: crate::keeper::names::pipe_prefix(guest, stream),
            held: Vec::new(),
        };
        tokio::spawn(
            actor
                .run(receiver)
                .instrument(tracing::info_span!("pipe", guest, stream)),
        );
        Self {
            commands,
            log: handle,
        }
    }

    /// Adds a pipe read end (made non-blocking by the caller); returns the offset its first
    /// byte will get.
    pub async fn add_pipe(&self, read_end: OwnedFd) -> Result<u64, LogError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::AddPipe(read_end, reply))
            .await
            .map_err(|_| ActorGone)?;
        Ok(answer.await.map_err(|_| ActorGone)??)
    }

    /// Stops the actor without reading further and returns its pipes' read ends (for an
    /// upgrade). The log is synced; the position record keeps saying a writer is attached.
    pub async fn freeze(&self) -> Vec<OwnedFd> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Freeze(reply)).await.is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }
}

struct PipeActor {
    owner: LogOwner,
    /// The pipe was lost when the daemon last stopped, and no new one came since.
    broken: bool,
    pipes: Vec<Receiver>,
    /// Prefix of the names the keeper holds the pipes under ([`crate::keeper`]).
    held_as: String,
    /// The keeper's name of each pipe, index for index.
    held: Vec<Option<String>>,
}

/// What woke the actor on the pipe side.
enum PipeEvent {
    /// Bytes were moved; look at commands, then continue.
    Progress,
    /// Pipe `index` has no writer left (or failed).
    Finished(usize),
    /// An import holds the output back, and some is waiting.
    Held,
}

impl PipeActor {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(Command::AddPipe(fd, reply)) => {
                        let _ = reply.send(self.add_pipe(fd));
                    }
                    Some(Command::Log(LogCommand::Import(step, reply))) => {
                        let ended = matches!(*step, ImportStep::End { .. });
                        let result = self.owner.import(*step).map(|_| self.owner.log.end_offset());
                        if ended && result.is_ok() {
                            self.import_ended();
                        }
                        let _ = reply.send(result);
                    }
                    Some(Command::Log(command)) => {
                        let broken = self.broken;
                        let answered = self
                            .owner
                            .answer(command, |figures| Figures { broken, ..figures });
                        if let Some(close) = answered {
                            self.shutdown(close.reason(), close.moved_to());
                            close.done();
                            return;
                        }
                    }
                    Some(Command::Freeze(reply)) => {
                        let _ = reply.send(self.freeze());
                        return;
                    }
                    None => {
                        self.shutdown("pipe handle dropped", None);
                        return;
                    }
                },
                () = switchover(self.owner.hold_deadline()) => {
                    self.owner.end_import("the switchover timeout passed before the source's stream was done; the source's later bytes are not here");
                    self.import_ended();
                }
                event = self.pump_unless_held() => {
                    if let PipeEvent::Held = event {
                        self.owner.output_waiting();
                    }
                    if let PipeEvent::Finished(index) = event {
                        self.pipes.swap_remove(index);
                        if let Some(name) = self.held.swap_remove(index) {
                            crate::keeper::release(&name);
                        }
                        self.owner.stats.writers.fetch_sub(1, Relaxed);
                        self.owner.metrics.pipe_writers.dec();
                        let left = self.pipes.len();
                        self.owner.note_event(EventKind::PipeClosed, &format!("{left} writers left"));
                        if self.pipes.is_empty() {
                            if let Err(e) = self.owner.log.set_open(false) {
                                tracing::warn!(path = %self.owner.log.path().display(), error = %e, "cannot record the closed pipe");
                            }
                        }
                    }
                }
            }
        }
    }

    fn add_pipe(&mut self, fd: OwnedFd) -> io::Result<u64> {
        self.broken = false;
        if let Err(e) = self.owner.log.set_open(true) {
            tracing::warn!(path = %self.owner.log.path().display(), error = %e, "cannot record the open pipe");
        }
        let held_as = crate::keeper::names::pipe(&self.held_as, &fd);
        Receiver::from_owned_fd(fd).map(|fd| {
            if let Some(name) = &held_as {
                crate::keeper::hold(name, fd.as_fd());
            }
            self.held.push(held_as);
            self.pipes.push(fd);
            self.owner.stats.writers.fetch_add(1, Relaxed);
            self.owner.metrics.pipe_writers.inc();
            let writers = self.pipes.len();
            // While an import holds the output, the event comes after the imported bytes.
            if !self.owner.guest_arrived() {
                self.owner
                    .note_event(EventKind::PipeOpened, &format!("{writers} writers"));
            }
            self.owner.log.end_offset()
        })
    }

    /// [`Self::pump`], unless an import holds the output back: then only tells once that
    /// some is waiting (the switchover deadline starts), and waits for the import to end.
    async fn pump_unless_held(&mut self) -> PipeEvent {
        if !self.owner.holding() {
            return self.pump().await;
        }
        if self.owner.awaiting_output() {
            any_readable(&self.pipes).await;
            return PipeEvent::Held;
        }
        std::future::pending().await
    }

    /// Waits until some pipe is readable and moves its bytes into the log.
    async fn pump(&mut self) -> PipeEvent {
        let Self { owner, pipes, .. } = self;
        if pipes.is_empty() {
            return std::future::pending().await;
        }
        poll_fn(|cx| {
            for (index, pipe) in pipes.iter().enumerate() {
                let mut moved = 0usize;
                loop {
                    match pipe.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => return Poll::Ready(PipeEvent::Finished(index)),
                        Poll::Pending => break,
                    }
                    let result = pipe.try_io(|| {
                        owner.counting_rotations(|log| move_bytes(log, pipe.as_fd()))
                    });
                    match result {
                        // Readiness was cleared; poll again to register the waker.
                        Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                        Ok(Moved::Bytes { logged, dropped }) => {
                            moved += logged + dropped;
                            owner.count_moved(logged, dropped);
                        }
                        Ok(Moved::Eof) => return Poll::Ready(PipeEvent::Finished(index)),
                        Err(e) => {
                            tracing::warn!(path = %owner.log.path().display(), error = %e, "pipe read failed");
                            return Poll::Ready(PipeEvent::Finished(index));
                        }
                    }
                    if moved >= BUDGET_PER_WAKE {
                        return Poll::Ready(PipeEvent::Progress);
                    }
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Hands the pipes back without reading them.
    fn freeze(&mut self) -> Vec<OwnedFd> {
        let pipes: Vec<OwnedFd> = self
            .pipes
            .drain(..)
            .filter_map(|pipe| pipe.into_nonblocking_fd().ok())
            .collect();
        self.owner
            .metrics
            .pipe_writers
            .dec_by(crate::metrics::gauge_value(pipes.len()));
        self.owner.stats.writers.store(0, Relaxed);
        // Carried to the next image under the same names: the keeper keeps holding them.
        self.held.clear();
        self.owner
            .note_event(EventKind::DaemonStopped, "handed over to a new conlogd");
        // No fsync: the next image runs on this host and shares the page cache; the position
        // record is saved when the log is dropped.
        pipes
    }

    /// An import ended (its last step, or the switchover timeout): a pipe handed over while it
    /// held the output is recorded now, after the imported bytes.
    fn import_ended(&mut self) {
        if !self.pipes.is_empty() {
            let writers = self.pipes.len();
            self.owner
                .note_event(EventKind::PipeOpened, &format!("{writers} writers"));
        }
    }

    /// Moves whatever the pipes still hold into the log, records the stop (`why`) in the time
    /// index (and the move, if the stream moved to another node), then syncs it.
    fn shutdown(&mut self, why: &str, moved_to: Option<&str>) {
        // What the pipes hold comes after whatever was imported.
        if self.owner.holding() {
            self.owner.end_import("the stream closed during the import");
        }
        for pipe in &self.pipes {
            loop {
                let moved = self
                    .owner
                    .counting_rotations(|log| move_bytes(log, pipe.as_fd()));
                match moved {
                    Ok(Moved::Bytes { logged, dropped }) => self.owner.count_moved(logged, dropped),
                    _ => break,
                }
            }
        }
        self.owner.publish();
        self.owner
            .metrics
            .pipe_writers
            .dec_by(crate::metrics::gauge_value(self.pipes.len()));
        self.owner.stats.writers.store(0, Relaxed);
        self.pipes.clear();
        for name in self.held.drain(..).flatten() {
            crate::keeper::release(&name);
        }
        if let Some(to) = moved_to {
            let end = self.owner.log.end_offset();
            self.owner
                .note_event(EventKind::MigratedOut, &format!("to {to} at offset {end}"));
        }
        self.owner.note_event(EventKind::DaemonStopped, why);
        self.owner.checkpoint();
    }
}
/// Resolves once any of `pipes` has bytes to read (or broke); never without pipes.
async fn any_readable(pipes: &[Receiver]) {
    if pipes.is_empty() {
        return std::future::pending().await;
    }
    poll_fn(|cx| {
        if pipes.iter().any(|pipe| pipe.poll_read_ready(cx).is_ready()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// Resolves at an import's switchover deadline; never without one.
pub(crate) async fn switchover(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    /// A stream's command channel allocates room for 32 commands when it is created, so a
    /// larger command costs every idle pipe stream memory (docs/performance.md, "Where the
    /// memory goes"): the log commands every stream shares must not make it grow.
    #[test]
    fn commands_stay_small() {
        assert!(std::mem::size_of::<super::Command>() <= 24);
        assert!(std::mem::size_of::<super::LogCommand>() <= 24);
    }
}
