//! Per-client output queues of a console: bounded by bytes, never waited on.
//!
//! Owns the queue between a console actor and one client, and the lag bookkeeping. The actor
//! only ever *offers* an event: if the client's queue has room it is queued, otherwise the
//! client is marked lagging and the bytes are skipped. When the queue has drained to half its
//! bound, the next output is preceded by a [`Event::Lagged`] with the exact missed range, so the
//! client can fetch it from history. The actor never blocks and a stuck client holds at most its
//! bound in memory.

use bytes::Bytes;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio_stream::Stream;

/// Accounting cost of a control event (its bytes are negligible but not free).
const CONTROL_COST: usize = 64;

/// What a console tells one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The attach succeeded: the first byte this client receives has `offset`.
    Attached {
        offset: u64,
        writer: bool,
        guest_connected: bool,
    },
    /// Guest output at an absolute offset.
    Output { offset: u64, data: Bytes },
    /// The client fell behind: offsets `from .. to` were skipped.
    Lagged { from: u64, to: u64 },
    /// QEMU connected to or disconnected from the guest socket.
    Guest { connected: bool },
    /// Another client took the writer lease; this one is a watcher now.
    WriterRevoked { reason: String },
    /// The console is going away (removed, shutdown or upgrade): the last event.
    Closed { reason: String, removed: bool },
}

impl Event {
    fn cost(&self) -> usize {
        match self {
            Event::Output { data, .. } => data.len() + CONTROL_COST,
            _ => CONTROL_COST,
        }
    }
}

/// The console's end of a client queue.
pub struct ClientQueue {
    sender: mpsc::UnboundedSender<Event>,
    queued: Arc<AtomicUsize>,
    bound: usize,
    /// Offset of the first byte skipped since the client fell behind.
    lagging_since: Option<u64>,
}

/// What happened to an offered output.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// Skipped; `true` when this output made the client start lagging.
    Skipped(bool),
    /// The client is gone.
    Gone,
}

/// Creates a queue bounded to `bound` bytes.
pub fn queue(bound: usize) -> (ClientQueue, ClientReceiver) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        ClientQueue {
            sender,
            queued: queued.clone(),
            bound,
            lagging_since: None,
        },
        ClientReceiver { receiver, queued },
    )
}

impl ClientQueue {
    /// Queues a control event regardless of the bound (they are few and small). False if the
    /// client is gone.
    pub fn control(&mut self, event: Event) -> bool {
        self.push(event)
    }

    /// Offers guest output; never waits.
    pub fn offer(&mut self, offset: u64, data: &Bytes) -> Offer {
        let queued = self.queued.load(Relaxed);
        if let Some(from) = self.lagging_since {
            if queued > self.bound / 2 {
                return Offer::Skipped(false);
            }
            if !self.push(Event::Lagged { from, to: offset }) {
                return Offer::Gone;
            }
            self.lagging_since = None;
        }
        if self.queued.load(Relaxed) + data.len() + CONTROL_COST > self.bound {
            self.lagging_since = Some(offset);
            return Offer::Skipped(true);
        }
        if self.push(Event::Output {
            offset,
            data: data.clone(),
        }) {
            Offer::Queued
        } else {
            Offer::Gone
        }
    }

    fn push(&mut self, event: Event) -> bool {
        let cost = event.cost();
        self.queued.fetch_add(cost, Relaxed);
        if self.sender.send(event).is_err() {
            self.queued.fetch_sub(cost, Relaxed);
            return false;
        }
        true
    }
}

/// The client's end: a stream of events that frees queue room as it is consumed.
pub struct ClientReceiver {
    receiver: mpsc::UnboundedReceiver<Event>,
    queued: Arc<AtomicUsize>,
}

impl ClientReceiver {
    /// The next event, or `None` when the console dropped this client.
    pub async fn recv(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let polled = self.receiver.poll_recv(cx);
        if let Poll::Ready(Some(event)) = &polled {
            self.queued.fetch_sub(event.cost(), Relaxed);
        }
        polled
    }
}

impl Stream for ClientReceiver {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.poll_event(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slow_client_is_skipped_and_told_the_exact_gap() {
        let (mut queue, mut receiver) = queue(1000);
        let chunk = Bytes::from(vec![b'x'; 300]);
        let mut offset = 0;
        let mut offers = Vec::new();
        for _ in 0..6 {
            offers.push(queue.offer(offset, &chunk));
            offset += 300;
        }
        // 300+64 fits twice in 1000; the third starts the lag at 600.
        assert_eq!(
            offers[..3],
            [Offer::Queued, Offer::Queued, Offer::Skipped(true)]
        );
        assert_eq!(
            offers[3..],
            [
                Offer::Skipped(false),
                Offer::Skipped(false),
                Offer::Skipped(false)
            ]
        );
        // The client catches up, then the next output comes with the gap report.
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Output {
                offset: 0,
                data: chunk.clone()
            }
        );
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Output {
                offset: 300,
                data: chunk.clone()
            }
        );
        assert_eq!(queue.offer(offset, &chunk), Offer::Queued);
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Lagged {
                from: 600,
                to: 1800
            }
        );
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Output {
                offset: 1800,
                data: chunk
            }
        );
        drop(receiver);
        assert_eq!(queue.offer(2100, &Bytes::from_static(b"y")), Offer::Gone);
    }
}
