//! Readers that reconnect by offset after every end of their call.

use crate::support::*;
use conlog::proto::{
    self, attach::Mode, console_client::ConsoleClient, read_history_request::Start,
    server_frame::Frame,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

// Readers that reconnect by offset

/// What a [`Reader`] reads.
#[derive(Clone, Debug)]
pub enum Source {
    /// `AttachConsole` (read-only) on `guest/serial0`; a gap between what it had and where a
    /// new attachment starts is filled with `ReadHistory`.
    Console { guest: String },
    /// `ReadHistory` with `follow`, resumed with `from_offset`.
    History { guest: String, stream: String },
}

/// What a [`Reader`] went through.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Calls that started (attached frame received, or ReadHistory answered).
    pub attaches: u32,
    /// Bytes received so far (the next offset).
    pub offset: u64,
    /// How every call that had started ended: `(code, message)`.
    pub ends: Vec<(Code, String)>,
    /// Attempts that failed before a call started (connect or call errors).
    pub failed_attempts: Vec<String>,
    /// `(from, to)` of every range filled with `ReadHistory` after a reattachment.
    pub gap_fills: Vec<(u64, u64)>,
    /// `guest_connected` of every attached frame (consoles).
    pub guest_connected: Vec<bool>,
    /// Frames other than output (consoles), in order.
    pub events: Vec<String>,
}

impl Progress {
    /// Failed attempts that an upgrade or a takeover may not cause (see
    /// [`super::leaving_image_failure`]).
    pub fn unexpected_failures(&self) -> Vec<&String> {
        self.failed_attempts
            .iter()
            .filter(|e| !super::leaving_image_failure(e))
            .collect()
    }
}

/// A client reading a stream from offset 0 that reconnects by offset whenever its call ends.
pub struct Reader {
    source: Source,
    target: watch::Sender<Option<u64>>,
    progress: Arc<Mutex<Progress>>,
    task: JoinHandle<Vec<u8>>,
}

impl Reader {
    /// Starts reading `source` from offset 0 through the daemon's local socket.
    pub fn start(socket: &Path, source: Source) -> Self {
        let (target, target_rx) = watch::channel(None);
        let progress = Arc::new(Mutex::new(Progress::default()));
        let task = tokio::spawn(read_loop(
            socket.to_owned(),
            source.clone(),
            target_rx,
            progress.clone(),
        ));
        Self {
            source,
            target,
            progress,
            task,
        }
    }

    /// What happened so far.
    pub fn progress(&self) -> Progress {
        self.progress.lock().unwrap().clone()
    }

    /// Waits (bounded) until at least `n` calls have started.
    pub async fn wait_attaches(&self, n: u32) {
        let deadline = Instant::now() + DEADLINE;
        while self.progress().attaches < n {
            assert!(
                !self.task.is_finished(),
                "reader of {:?} stopped: {:?}",
                self.source,
                self.progress()
            );
            assert!(
                Instant::now() < deadline,
                "reader of {:?}: {n} calls not started after {DEADLINE:?}: {:?}",
                self.source,
                self.progress()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Reads (bounded) up to offset `end`, stops, and returns everything read and the story.
    pub async fn finish(self, end: u64) -> (Vec<u8>, Progress) {
        self.target.send_replace(Some(end));
        let data = bounded(
            &format!("reader of {:?} up to {end}", self.source),
            self.task,
        )
        .await
        .expect("reader task panicked");
        let progress = self.progress.lock().unwrap().clone();
        (data, progress)
    }
}

fn reached(target: &watch::Receiver<Option<u64>>, offset: u64) -> bool {
    target.borrow().is_some_and(|end| offset >= end)
}

async fn read_loop(
    socket: PathBuf,
    source: Source,
    mut target: watch::Receiver<Option<u64>>,
    progress: Arc<Mutex<Progress>>,
) -> Vec<u8> {
    let mut data = Vec::new();
    let mut failing_since: Option<Instant> = None;
    let note = |f: &dyn Fn(&mut Progress)| f(&mut progress.lock().unwrap());
    loop {
        if reached(&target, data.len() as u64) {
            return data;
        }
        if let Some(since) = failing_since {
            assert!(
                since.elapsed() < DEADLINE,
                "reader of {source:?} cannot reconnect for {DEADLINE:?}: {:?}",
                progress.lock().unwrap()
            );
        }
        let channel = match conlog::client::connect_local(&socket).await {
            Ok(channel) => channel,
            Err(e) => {
                note(&|p| p.failed_attempts.push(format!("connect: {e:?}")));
                failing_since.get_or_insert_with(Instant::now);
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        match &source {
            Source::Console { guest } => {
                let mut session =
                    match Session::attach(channel, attach(guest, Mode::ReadOnly)).await {
                        Ok(session) => session,
                        Err(status) => {
                            note(&|p| p.failed_attempts.push(format!("attach: {status:?}")));
                            failing_since.get_or_insert_with(Instant::now);
                            tokio::time::sleep(POLL).await;
                            continue;
                        }
                    };
                failing_since = None;
                session.keep_output = false;
                let start = session.attached.offset;
                let connected = session.attached.guest_connected;
                note(&|p| {
                    p.attaches += 1;
                    p.guest_connected.push(connected);
                });
                let have = data.len() as u64;
                assert!(
                    start >= have,
                    "attached at offset {start}, before what was already read ({have})"
                );
                if start > have {
                    fill_gap(&socket, guest, DEVICE, &mut data, start).await;
                    note(&|p| p.gap_fills.push((have, start)));
                }
                loop {
                    note(&|p| p.offset = data.len() as u64);
                    if reached(&target, data.len() as u64) {
                        return data;
                    }
                    tokio::select! {
                        frame = session.next() => match frame {
                            Ok(Some(Frame::Output(output))) => data.extend_from_slice(&output.data),
                            Ok(Some(other)) => note(&|p| p.events.push(format!("{other:?}"))),
                            Ok(None) => {
                                note(&|p| p.ends.push((Code::Ok, "end of stream".into())));
                                break;
                            }
                            Err(status) => {
                                note(&|p| p.ends.push((status.code(), status.message().into())));
                                break;
                            }
                        },
                        _ = target.changed() => {}
                    }
                }
            }
            Source::History { guest, stream } => {
                let request = proto::ReadHistoryRequest {
                    follow: true,
                    ..history_from(guest, stream, data.len() as u64)
                };
                let mut chunks = match read_history(channel, request).await {
                    Ok(chunks) => chunks,
                    Err(status) => {
                        note(&|p| p.failed_attempts.push(format!("ReadHistory: {status:?}")));
                        failing_since.get_or_insert_with(Instant::now);
                        tokio::time::sleep(POLL).await;
                        continue;
                    }
                };
                failing_since = None;
                note(&|p| p.attaches += 1);
                loop {
                    note(&|p| p.offset = data.len() as u64);
                    if reached(&target, data.len() as u64) {
                        return data;
                    }
                    tokio::select! {
                        chunk = tokio::time::timeout(DEADLINE, chunks.message()) => match chunk {
                            Err(_) => panic!(
                                "ReadHistory follower of {guest}/{stream}: nothing for {DEADLINE:?} at offset {}",
                                data.len()
                            ),
                            Ok(Ok(Some(chunk))) => append_chunk(&mut data, &chunk, guest, stream),
                            Ok(Ok(None)) => {
                                note(&|p| p.ends.push((Code::Ok, "end of stream".into())));
                                break;
                            }
                            Ok(Err(status)) => {
                                note(&|p| p.ends.push((status.code(), status.message().into())));
                                break;
                            }
                        },
                        _ = target.changed() => {}
                    }
                }
            }
        }
    }
}

/// Reads `guest/stream` from `data.len()` up to `end` with `ReadHistory` (retrying, bounded),
/// appending to `data`.
pub async fn fill_gap(socket: &Path, guest: &str, stream: &str, data: &mut Vec<u8>, end: u64) {
    let deadline = Instant::now() + DEADLINE;
    let mut errors = Vec::new();
    while (data.len() as u64) < end {
        assert!(
            Instant::now() < deadline,
            "cannot read {guest}/{stream} {}..{end} with ReadHistory: {errors:?}",
            data.len()
        );
        let Ok(channel) = conlog::client::connect_local(socket).await else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        let request = proto::ReadHistoryRequest {
            limit_bytes: end - data.len() as u64,
            ..history_from(guest, stream, data.len() as u64)
        };
        let mut chunks = match read_history(channel, request).await {
            Ok(chunks) => chunks,
            Err(status) => {
                errors.push(status);
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        loop {
            match bounded("a HistoryChunk", chunks.message()).await {
                Ok(Some(chunk)) => append_chunk(data, &chunk, guest, stream),
                Ok(None) => break,
                Err(status) => {
                    errors.push(status);
                    break;
                }
            }
        }
    }
    assert_eq!(data.len() as u64, end, "ReadHistory read past its limit");
}

/// A `ReadHistory` of `guest/stream` from offset `from`, to be completed (`follow`,
/// `limit_bytes`).
fn history_from(guest: &str, stream: &str, from: u64) -> proto::ReadHistoryRequest {
    proto::ReadHistoryRequest {
        guest: guest.into(),
        stream: stream.into(),
        start: Some(Start::FromOffset(from)),
        ..Default::default()
    }
}

/// Starts `request` (bounded) on `channel`: the chunks, or the status it was refused with.
async fn read_history(
    channel: Channel,
    request: proto::ReadHistoryRequest,
) -> Result<Streaming<proto::HistoryChunk>, Status> {
    bounded(
        "ReadHistory",
        ConsoleClient::new(channel).read_history(request),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Appends a chunk of `guest/stream` to `data`, which it must continue: no gap, at the offset
/// `data` ends at.
fn append_chunk(data: &mut Vec<u8>, chunk: &proto::HistoryChunk, guest: &str, stream: &str) {
    assert!(
        chunk.gap.is_none(),
        "history gap in {guest}/{stream}: {chunk:?}"
    );
    assert_eq!(
        chunk.offset,
        data.len() as u64,
        "history chunk of {guest}/{stream} out of place"
    );
    data.extend_from_slice(&chunk.data);
}
