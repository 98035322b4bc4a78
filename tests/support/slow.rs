//! Slow clients of a daemon's UNIX socket (slow-loris): connections that say nothing, stall
//! after a few bytes, or trickle bytes, held open until dropped.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::DEADLINE;

/// Slow clients of every kind, held open; a thread trickles bytes into some of them.
pub struct SlowClients {
    streams: Vec<(&'static str, UnixStream)>,
    stop: Arc<AtomicBool>,
    trickler: Option<std::thread::JoinHandle<()>>,
}

impl SlowClients {
    /// Connects to `path`: `each` clients that send nothing, `each` that send `stalled` and
    /// stop, and `each` that send one byte of `trickle` per `pace` (for at most [`DEADLINE`]),
    /// then stop.
    pub fn start(path: &Path, each: usize, stalled: &[u8], trickle: &[u8], pace: Duration) -> Self {
        let connect =
            || UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {path:?}: {e}"));
        let mut streams = Vec::new();
        let mut trickling = Vec::new();
        for _ in 0..each {
            streams.push(("silent", connect()));
            let mut stalling = connect();
            stalling.write_all(stalled).unwrap();
            streams.push(("stalled", stalling));
            let trickler = connect();
            trickling.push(trickler.try_clone().unwrap());
            streams.push(("trickling", trickler));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let trickle = trickle.to_vec();
        let trickler = std::thread::spawn(move || {
            let deadline = Instant::now() + DEADLINE;
            for byte in trickle {
                if stopped.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                for stream in &mut trickling {
                    // A client the daemon cut off fails here; that is its business.
                    let _ = stream.write_all(&[byte]);
                }
                std::thread::sleep(pace);
            }
        });
        Self {
            streams,
            stop,
            trickler: Some(trickler),
        }
    }

    /// How many clients there are.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Panics unless every slow client is still connected and has had no answer.
    pub fn assert_all_waiting(&self) {
        let mut byte = [0u8; 1];
        for (what, stream) in &self.streams {
            stream.set_nonblocking(true).unwrap();
            match (&*stream).read(&mut byte) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                other => panic!("a {what} client was answered or closed already: {other:?}"),
            }
            stream.set_nonblocking(false).unwrap();
        }
    }

    /// Reads (bounded) what each client receives until the daemon closes it, while the
    /// trickling goes on; returns it. Blocking.
    pub fn answers(mut self) -> Vec<(&'static str, Vec<u8>)> {
        self.streams
            .drain(..)
            .map(|(what, mut stream)| {
                stream.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut answer = Vec::new();
                if let Err(e) = stream.read_to_end(&mut answer) {
                    if e.kind() != ErrorKind::ConnectionReset {
                        panic!("a {what} client: {e} (was it ever closed?)");
                    }
                }
                (what, answer)
            })
            .collect()
    }
}

impl Drop for SlowClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(trickler) = self.trickler.take() {
            let _ = trickler.join();
        }
    }
}
