//! Per-client output queues of a console: bounded by bytes, never waited on.
//!
//! Owns the queue between a console actor and one client, and the lag bookkeeping. The actor
//! only ever *offers* an event: if the client's queue has room it is queued, otherwise the
//! client is marked lagging and the bytes are skipped. When the queue has drained to half its
//! bound, the next output is preceded by a [`Event::Lagged`] with the exact missed range, so the
//! client can fetch it from history; a client that has read everything queued gets that report
//! at once, without waiting for more output (a burst's end would otherwise leave it untold
//! until the guest prints again). The actor never blocks and a stuck client holds at most its
//! bound in memory. Control events are few and small and are queued regardless of the bound,
//! except the guest's connection state, which a QEMU reconnecting in a loop could repeat without
//! end: over the bound only its latest value is kept, and it is delivered before anything queued
//! after it, or once the client has read everything before it.

use bytes::Bytes;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
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
        /// The console can carry a serial BREAK (created with the mux protocol).
        serial_break: bool,
    },
    /// Guest output at an absolute offset.
    Output { offset: u64, data: Bytes },
    /// The client fell behind: offsets `from .. to` were skipped.
    Lagged { from: u64, to: u64 },
    /// QEMU connected to or disconnected from the guest socket.
    Guest { connected: bool },
    /// Another client took the writer lease; this one is a watcher now.
    WriterRevoked { reason: String },
    /// The console is going away (removed, moved to another node, shutdown or upgrade): the
    /// last event.
    Closed {
        reason: String,
        removed: bool,
        /// Where it moved (a removal with `moved_to`): clients get the moved status.
        moved: Option<crate::migration::Moved>,
    },
}

impl Event {
    fn cost(&self) -> usize {
        match self {
            Event::Output { data, .. } => data.len() + CONTROL_COST,
            _ => CONTROL_COST,
        }
    }
}

/// The range a lagging client missed, shared by both ends of its queue: the console extends
/// it, and whichever end reports it first (the console before the next output that fits, the
/// client once it has read everything queued) clears it.
#[derive(Default)]
struct LagState {
    /// Offset of the first byte skipped since the client fell behind.
    since: Option<u64>,
    /// Offset after the last byte skipped.
    until: u64,
}

type Lag = Arc<Mutex<LagState>>;

/// A guest connection state not queued yet: [`NO_GUEST_STATE`], or 1 + `connected`.
type GuestState = Arc<AtomicU8>;
const NO_GUEST_STATE: u8 = 0;

fn guest_state(connected: bool) -> u8 {
    1 + u8::from(connected)
}

/// The console's end of a client queue.
pub struct ClientQueue {
    sender: mpsc::UnboundedSender<Event>,
    queued: Arc<AtomicUsize>,
    /// The latest guest state that did not fit (see the module doc).
    guest: GuestState,
    bound: usize,
    /// What the client missed since it fell behind, not reported yet.
    lag: Lag,
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
    let guest = GuestState::default();
    let lag = Lag::default();
    (
        ClientQueue {
            sender,
            queued: queued.clone(),
            guest: guest.clone(),
            bound,
            lag: lag.clone(),
        },
        ClientReceiver {
            receiver,
            queued,
            guest,
            lag,
        },
    )
}

impl ClientQueue {
    /// Queues a control event regardless of the bound (they are few and small), except a
    /// guest state over the bound, which replaces the one kept before. False if the client is
    /// gone.
    pub fn control(&mut self, event: Event) -> bool {
        if let Event::Guest { connected } = event {
            if self.guest.load(SeqCst) != NO_GUEST_STATE
                || self.queued.load(SeqCst) + CONTROL_COST > self.bound
            {
                self.guest.store(guest_state(connected), SeqCst);
                // The client may have read everything meanwhile and wait for more: then
                // nothing would wake it for the state kept.
                if self.queued.load(SeqCst) == 0 {
                    return self.flush_guest();
                }
                return !self.sender.is_closed();
            }
        }
        self.send(event)
    }

    /// Offers guest output; never waits. Output that could not fit even an empty queue (a
    /// queue smaller than one of the console's output chunks) is offered in pieces that fit
    /// once the queue drained to half its bound, so that a client with a small queue still
    /// gets output and exact `lagged` ranges instead of skipping every chunk.
    pub fn offer(&mut self, offset: u64, data: &Bytes) -> Offer {
        if data.len() + CONTROL_COST <= self.bound {
            return self.offer_piece(offset, data);
        }
        let piece = (self.bound / 2).saturating_sub(2 * CONTROL_COST).max(1);
        let (mut last, mut started) = (Offer::Queued, false);
        let mut at = 0;
        while at < data.len() {
            let end = (at + piece).min(data.len());
            last = self.offer_piece(offset + at as u64, &data.slice(at..end));
            match last {
                Offer::Gone => return Offer::Gone,
                Offer::Skipped(true) => started = true,
                Offer::Queued | Offer::Skipped(false) => {}
            }
            at = end;
        }
        match last {
            Offer::Skipped(_) => Offer::Skipped(started),
            other => other,
        }
    }

    /// Offers one piece of output that can fit.
    fn offer_piece(&mut self, offset: u64, data: &Bytes) -> Offer {
        // Held while queuing too, so the client never reports a lag ahead of output queued
        // before it (the client takes the lag only with nothing queued).
        let lag = self.lag.clone();
        let mut lag = lag.lock().unwrap_or_else(PoisonError::into_inner);
        let end = offset + data.len() as u64;
        if let Some(from) = lag.since {
            if self.queued.load(SeqCst) > self.bound / 2 {
                lag.until = end;
                return Offer::Skipped(false);
            }
            if !self.send(Event::Lagged { from, to: offset }) {
                return Offer::Gone;
            }
            lag.since = None;
        }
        if self.queued.load(SeqCst) + data.len() + CONTROL_COST > self.bound {
            lag.since = Some(offset);
            lag.until = end;
            return Offer::Skipped(true);
        }
        if self.send(Event::Output {
            offset,
            data: data.clone(),
        }) {
            Offer::Queued
        } else {
            Offer::Gone
        }
    }

    /// Queues `event` after the guest state kept, if any.
    fn send(&mut self, event: Event) -> bool {
        self.flush_guest() && self.push(event)
    }

    /// Queues the guest state kept, if any (the client may have taken it already).
    fn flush_guest(&mut self) -> bool {
        match self.guest.swap(NO_GUEST_STATE, SeqCst) {
            NO_GUEST_STATE => true,
            state => self.push(Event::Guest {
                connected: state == guest_state(true),
            }),
        }
    }

    fn push(&mut self, event: Event) -> bool {
        let cost = event.cost();
        self.queued.fetch_add(cost, SeqCst);
        if self.sender.send(event).is_err() {
            self.queued.fetch_sub(cost, SeqCst);
            return false;
        }
        true
    }
}

/// The client's end: a stream of events that frees queue room as it is consumed.
pub struct ClientReceiver {
    receiver: mpsc::UnboundedReceiver<Event>,
    queued: Arc<AtomicUsize>,
    guest: GuestState,
    lag: Lag,
}

impl ClientReceiver {
    /// The range missed, if the client fell behind and has read everything queued since: it
    /// is reported now rather than with the next output, which may not come for a long time.
    fn take_lag(&self) -> Option<Event> {
        let mut lag = self.lag.lock().unwrap_or_else(PoisonError::into_inner);
        if self.queued.load(SeqCst) != 0 {
            return None;
        }
        let from = lag.since.take()?;
        Some(Event::Lagged {
            from,
            to: lag.until,
        })
    }

    /// The next event, or `None` when the console dropped this client.
    pub async fn recv(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        match self.receiver.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                self.queued.fetch_sub(event.cost(), SeqCst);
                Poll::Ready(Some(event))
            }
            // Everything queued is read: the guest state kept, if any, the newest news, then
            // a lag not reported yet (the order the console would queue them in).
            Poll::Pending => match self.take_guest() {
                Poll::Pending => match self.take_lag() {
                    Some(lagged) => Poll::Ready(Some(lagged)),
                    None => Poll::Pending,
                },
                ready => ready,
            },
            Poll::Ready(None) => Poll::Ready(None),
        }
    }

    fn take_guest(&mut self) -> Poll<Option<Event>> {
        match self.guest.swap(NO_GUEST_STATE, SeqCst) {
            NO_GUEST_STATE => Poll::Pending,
            state => Poll::Ready(Some(Event::Guest {
                connected: state == guest_state(true),
            })),
        }
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
    async fn output_larger_than_a_small_queue_is_offered_in_pieces_with_exact_gaps() {
        let (mut queue, mut receiver) = queue(4096);
        let chunk = Bytes::from((0..=255u8).cycle().take(65_536).collect::<Vec<u8>>());
        assert_eq!(queue.offer(0, &chunk), Offer::Skipped(true));
        assert_eq!(queue.offer(65_536, &chunk), Offer::Skipped(false));
        // What fitted of the first chunk, in order from its first byte.
        let mut next = 0;
        while let Ok(event) = receiver.receiver.try_recv() {
            receiver.queued.fetch_sub(event.cost(), SeqCst);
            let Event::Output { offset, data } = event else {
                panic!("{event:?}");
            };
            assert_eq!(offset, next);
            assert_eq!(
                data,
                chunk.slice(
                    usize::try_from(offset).unwrap()..usize::try_from(next).unwrap() + data.len()
                )
            );
            next += data.len() as u64;
        }
        assert!(
            next > 0,
            "some of a chunk larger than the queue is delivered"
        );
        // Drained: the next output comes after the exact gap, and in pieces too.
        assert_eq!(queue.offer(131_072, &chunk), Offer::Skipped(true));
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Lagged {
                from: next,
                to: 131_072
            }
        );
        let Event::Output { offset, data } = receiver.recv().await.unwrap() else {
            panic!("output after the gap");
        };
        assert_eq!(offset, 131_072);
        assert_eq!(data, chunk.slice(..data.len()));
    }

    #[tokio::test]
    async fn a_client_that_read_everything_is_told_its_gap_without_more_output() {
        let (mut queue, mut receiver) = queue(1000);
        let chunk = Bytes::from(vec![b'x'; 300]);
        for n in 0..6 {
            queue.offer(n * 300, &chunk);
        }
        for offset in [0, 300] {
            assert_eq!(
                receiver.recv().await.unwrap(),
                Event::Output {
                    offset,
                    data: chunk.clone()
                }
            );
        }
        // The burst is over: nothing more is offered, and the gap is reported anyway.
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Lagged {
                from: 600,
                to: 1800
            }
        );
        // Reported once: the next output follows on directly.
        assert_eq!(queue.offer(1800, &chunk), Offer::Queued);
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Output {
                offset: 1800,
                data: chunk
            }
        );
    }

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

    #[tokio::test]
    async fn guest_state_over_the_bound_keeps_only_the_latest() {
        let (mut queue, mut receiver) = queue(1000);
        let chunk = Bytes::from(vec![b'x'; 900]);
        assert_eq!(queue.offer(0, &chunk), Offer::Queued);
        // A QEMU reconnecting in a loop while the client does not read.
        for i in 0..10_000 {
            assert!(queue.control(Event::Guest {
                connected: i % 2 == 1
            }));
        }
        assert!(queue.queued.load(SeqCst) < 1000);
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Output {
                offset: 0,
                data: chunk.clone()
            }
        );
        // Nothing else queued: the kept state comes next, once.
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Guest { connected: true }
        );
        // Kept again, then output: the state goes first.
        assert_eq!(queue.offer(900, &chunk), Offer::Queued);
        assert!(queue.control(Event::Guest { connected: false }));
        assert!(queue.control(Event::Guest { connected: true }));
        assert!(queue.control(Event::Guest { connected: false }));
        assert_eq!(queue.offer(1800, &chunk), Offer::Skipped(true));
        assert!(matches!(
            receiver.recv().await.unwrap(),
            Event::Output { offset: 900, .. }
        ));
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Guest { connected: false }
        );
        assert_eq!(queue.offer(2700, &Bytes::from_static(b"y")), Offer::Queued);
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Lagged {
                from: 1800,
                to: 2700
            }
        );
        assert!(matches!(
            receiver.recv().await.unwrap(),
            Event::Output { offset: 2700, .. }
        ));
        // Under the bound, states are queued as they come.
        assert!(queue.control(Event::Guest { connected: true }));
        assert!(queue.control(Event::Guest { connected: false }));
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Guest { connected: true }
        );
        assert_eq!(
            receiver.recv().await.unwrap(),
            Event::Guest { connected: false }
        );
    }
}
