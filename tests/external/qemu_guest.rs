//! End to end with a real guest: QEMU (TCG) boots Debian's cloud kernel and a busybox initramfs
//! with its serial port on a console's guest socket. Boot output reaches the log and two attached
//! clients with contiguous offsets, a command typed through `AttachConsole` runs in the guest and
//! its output comes back, and a watcher's input never reaches the guest. A second test takes the
//! running guest through an in-place upgrade of conlogd (QEMU's connection is carried) and a
//! `kill -9` (QEMU, with `reconnect=1`, comes back by itself).
//!
//! The guest is built (and cached under `<target dir>/qemu-guest`) by `tests/qemu/build-guest.sh`,
//! which fetches two .deb files from Debian's registry the first time. QEMU itself must be
//! installed: Debian's `qemu-system-x86` (scripts/test.sh installs it). Without it this test fails,
//! it does not skip.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;

use conlog::proto::{
    self, client_frame, console_client::ConsoleClient, server_frame, ClientFrame, ServerFrame,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub(crate) const QEMU: &str = "qemu-system-x86_64";
const APT_PACKAGES: &str = "qemu-system-x86";
pub(crate) const GUEST: &str = "qemu-e2e";
pub(crate) const DEVICE: &str = "serial0";
/// Printed by tests/qemu/init before it starts the shell.
pub(crate) const BANNER: &str = "conlog test guest: init started";
/// The shell's prompt (PS1 in tests/qemu/init).
pub(crate) const PROMPT: &str = "conlog-guest# ";
/// A kernel line near the start of every boot.
pub(crate) const KERNEL_LINE: &str = "Linux version";
/// Building the guest the first time downloads about 28 MB.
const BUILD_DEADLINE: Duration = Duration::from_secs(600);
/// Boot to a prompt takes a few seconds under TCG; a loaded machine gets plenty more.
pub(crate) const BOOT_DEADLINE: Duration = Duration::from_secs(120);
/// A command's round trip once the shell is up.
pub(crate) const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// The cargo target directory of this build (`<target>/<profile>/deps/<this test>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    exe.ancestors()
        .nth(3)
        .expect("the test binary lives in <target>/<profile>/deps")
        .to_owned()
}

/// One QEMU guest at a time in this binary: each boots under TCG, and two or three at once
/// beside the other external tests on a 2-CPU machine stretch boots and commands past their
/// deadlines. Held for the whole test.
pub(crate) async fn one_guest_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static QEMU_GUEST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    QEMU_GUEST.lock().await
}

/// Fails (does not skip) when QEMU is missing, naming what to install.
pub(crate) fn require_qemu() {
    match Command::new(QEMU).arg("--version").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "`{QEMU} --version` failed: {}\nInstall Debian's packages: apt-get install -y {APT_PACKAGES}",
            describe(&output)
        ),
        Err(e) => panic!(
            "{QEMU} is not available ({e}): this test boots a real guest. Install Debian's \
             packages: apt-get install -y {APT_PACKAGES} (scripts/test.sh does this for CI)"
        ),
    }
}

/// Runs tests/qemu/build-guest.sh (cached) and returns the kernel and the initramfs.
pub(crate) async fn build_guest() -> (PathBuf, PathBuf) {
    let out = target_dir().join("qemu-guest");
    let script = repo_dir().join("tests/qemu/build-guest.sh");
    let child = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", script.display()));
    // On timeout the child is dropped, which kills it.
    let output = tokio::time::timeout(BUILD_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} did not finish within {BUILD_DEADLINE:?}",
                script.display()
            )
        })
        .expect("wait for build-guest.sh");
    assert!(
        output.status.success(),
        "{} {} failed:\n{}",
        script.display(),
        out.display(),
        describe(&output)
    );
    (out.join("vmlinuz"), out.join("initramfs.gz"))
}

/// A QEMU process, killed when dropped (also when the test panics).
pub(crate) struct Qemu {
    child: Option<Child>,
    output: PathBuf,
    _dir: tempfile::TempDir,
}

/// The QEMU arguments that wire the guest's serial port to its console, as `conlogctl
/// create-console --print qemu-legacy` renders them (the installed QEMU is older than 9.2):
/// QEMU boots with exactly what an operator would paste.
fn rendered_wiring(daemon: &Daemon, guest_socket: &Path) -> Vec<String> {
    let out = run_bounded(
        Command::new(conlogctl_bin())
            .arg("--socket")
            .arg(daemon.socket())
            .args(["create-console", GUEST, "--device", DEVICE])
            .args(["--print", "qemu-legacy"]),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let socket = guest_socket.to_str().expect("UTF-8 socket path");
    assert!(text.contains(&format!("path={socket},")), "{text}");
    text.split_whitespace().map(str::to_owned).collect()
}

impl Qemu {
    fn start(kernel: &Path, initrd: &Path, wiring: &[String]) -> Self {
        Self::start_with(kernel, initrd, "256", wiring)
    }

    /// Boots the guest with `memory` (QEMU's `-m`) and `wiring` (any further arguments: the
    /// serial port's chardev, `-incoming`, a monitor).
    pub(crate) fn start_with(
        kernel: &Path,
        initrd: &Path,
        memory: &str,
        wiring: &[String],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("conlog-qemu-")
            .tempdir()
            .expect("temporary directory");
        let output = dir.path().join("qemu.out");
        let file = std::fs::File::create(&output).expect("QEMU output file");
        let child = Command::new(QEMU)
            .args(["-M", "pc", "-accel", "tcg", "-m", memory])
            .args(["-nographic", "-nodefaults", "-no-reboot"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 panic=-1"])
            .args(wiring)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {QEMU}: {e}"));
        Self {
            child: Some(child),
            output,
            _dir: dir,
        }
    }

    /// QEMU's own stdout and stderr, for failure messages.
    pub(crate) fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// QEMU's exit status, once it has exited.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("try_wait QEMU")
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a client received, checked as it arrives.
#[derive(Default)]
pub(crate) struct Transcript {
    /// Offset of `data[0]` (from the attached frame).
    start: u64,
    /// Offset the next output frame must have.
    next: u64,
    data: Vec<u8>,
    output_frames: usize,
    /// Guest connected/disconnected frames, in order.
    guest_states: Vec<bool>,
    /// Anything that breaks the contract (gaps, lagged frames, frames out of place).
    problems: Vec<String>,
    /// How the stream ended, once it has.
    ended: Option<String>,
}

impl Transcript {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    fn tail(&self) -> String {
        let text = strip_ansi(&self.text());
        let start = text.len().saturating_sub(3000);
        let start = (start..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    fn take(&mut self, frame: ServerFrame) {
        match frame.frame {
            Some(server_frame::Frame::Output(output)) => {
                if output.offset != self.next {
                    self.problems.push(format!(
                        "output frame at offset {} where {} was expected",
                        output.offset, self.next
                    ));
                }
                self.next = output.offset + output.data.len() as u64;
                self.data.extend_from_slice(&output.data);
                self.output_frames += 1;
            }
            Some(server_frame::Frame::Guest(state)) => self.guest_states.push(state.connected),
            Some(server_frame::Frame::Lagged(lagged)) => self.problems.push(format!(
                "lagged frame {}..{}",
                lagged.from_offset, lagged.to_offset
            )),
            other => self.problems.push(format!("unexpected frame {other:?}")),
        }
    }
}

/// An `AttachConsole` client whose frames are collected by a task.
pub(crate) struct Client {
    name: &'static str,
    attached: proto::Attached,
    input: mpsc::Sender<ClientFrame>,
    seen: Arc<Mutex<Transcript>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    pub(crate) async fn attach(
        channel: Channel,
        name: &'static str,
        mode: proto::attach::Mode,
    ) -> Self {
        let (input, frames) = mpsc::channel(16);
        input
            .send(ClientFrame {
                frame: Some(client_frame::Frame::Attach(proto::Attach {
                    guest: GUEST.into(),
                    device: DEVICE.into(),
                    mode: mode.into(),
                    force: false,
                    replay_bytes: 1 << 20,
                })),
            })
            .await
            .unwrap();
        let mut stream = ConsoleClient::new(channel)
            .attach_console(ReceiverStream::new(frames))
            .await
            .unwrap_or_else(|s| panic!("AttachConsole ({name}): {s:?}"))
            .into_inner();
        let first = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no attached frame for {name} within {DEADLINE:?}"))
            .unwrap_or_else(|s| panic!("AttachConsole ({name}): {s:?}"));
        let Some(ServerFrame {
            frame: Some(server_frame::Frame::Attached(attached)),
        }) = first
        else {
            panic!("the first frame of {name} is not attached: {first:?}");
        };
        let seen = Arc::new(Mutex::new(Transcript {
            start: attached.offset,
            next: attached.offset,
            ..Transcript::default()
        }));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                let ended = loop {
                    match stream.message().await {
                        Ok(Some(frame)) => seen.lock().unwrap().take(frame),
                        Ok(None) => break "end of stream".to_owned(),
                        Err(status) => break format!("{status:?}"),
                    }
                };
                seen.lock().unwrap().ended = Some(ended);
            }
        });
        Self {
            name,
            attached,
            input,
            seen,
            task,
        }
    }

    pub(crate) async fn type_text(&self, text: &str) {
        self.input
            .send(ClientFrame {
                frame: Some(client_frame::Frame::Input(proto::Input {
                    data: text.as_bytes().to_vec().into(),
                })),
            })
            .await
            .unwrap_or_else(|_| panic!("the input stream of {} is closed", self.name));
    }

    /// Sends `data` as one input frame (any bytes, 0xFF included).
    async fn type_bytes(&self, data: &[u8]) {
        self.input
            .send(ClientFrame {
                frame: Some(client_frame::Frame::Input(proto::Input {
                    data: data.to_vec().into(),
                })),
            })
            .await
            .unwrap_or_else(|_| panic!("the input stream of {} is closed", self.name));
    }

    /// Sends a serial BREAK.
    async fn send_break(&self) {
        self.input
            .send(ClientFrame {
                frame: Some(client_frame::Frame::SerialBreak(proto::SerialBreak {})),
            })
            .await
            .unwrap_or_else(|_| panic!("the input stream of {} is closed", self.name));
    }

    pub(crate) fn snapshot<T>(&self, f: impl FnOnce(&Transcript) -> T) -> T {
        f(&self.seen.lock().unwrap())
    }

    pub(crate) fn describe(&self) -> String {
        self.snapshot(|t| {
            format!(
                "--- {}: offsets {}..{}, {} output frames, guest states {:?}, problems {:?}, \
                 ended {:?}; last output:\n{}\n---",
                self.name,
                t.start,
                t.next,
                t.output_frames,
                t.guest_states,
                t.problems,
                t.ended,
                t.tail()
            )
        })
    }
}

/// Everything a failure message shows.
struct Scene {
    daemon: Daemon,
    qemu: Option<Qemu>,
    clients: Vec<Client>,
    log_path: PathBuf,
}

impl Scene {
    fn context(&self) -> String {
        let clients: Vec<String> = self.clients.iter().map(Client::describe).collect();
        let log = std::fs::read(&self.log_path).unwrap_or_default();
        format!(
            "{}\nlog file {} holds {} bytes\nconlogd:\n{}",
            clients.join("\n"),
            self.log_path.display(),
            log.len(),
            self.daemon.all_stderr()
        )
    }

    /// Waits until `done` holds, failing after `deadline` or as soon as QEMU exits.
    async fn wait(&mut self, what: &str, deadline: Duration, done: impl Fn(&Scene) -> bool) {
        let until = Instant::now() + deadline;
        loop {
            if done(self) {
                return;
            }
            if let Some(status) = self.qemu.as_mut().and_then(Qemu::exited) {
                let qemu = self.qemu.as_ref().map(Qemu::output).unwrap_or_default();
                panic!(
                    "{QEMU} exited ({status}) while waiting for {what}; its output:\n{qemu}\n{}",
                    self.context()
                );
            }
            if Instant::now() > until {
                let qemu = self.qemu.as_ref().map(Qemu::output).unwrap_or_default();
                panic!(
                    "no {what} within {deadline:?}\nQEMU output:\n{qemu}\n{}",
                    self.context()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn client_has(&self, client: usize, needle: &str) -> bool {
        self.clients[client].snapshot(|t| t.text().contains(needle))
    }

    fn log(&self) -> Vec<u8> {
        std::fs::read(&self.log_path).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_guest_boots_logs_and_runs_typed_commands() {
    let started = Instant::now();
    require_qemu();
    let _one = one_guest_at_a_time().await;
    let (kernel, initrd) = build_guest().await;
    let built = started.elapsed();

    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = agent
        .create_console(proto::CreateConsoleRequest {
            guest: GUEST.into(),
            device: DEVICE.into(),
            limits: None,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("CreateConsole: {s:?}"))
        .into_inner();
    let guest_socket = PathBuf::from(&console.guest_socket);
    assert!(
        guest_socket.exists(),
        "CreateConsole answered {console:?} but {} does not exist",
        guest_socket.display()
    );
    assert_eq!(
        PathBuf::from(&console.log_path),
        daemon.log_path(GUEST, DEVICE)
    );

    // Both clients are there before QEMU starts, so they see the whole boot from offset 0.
    let channel = conlog::client::connect_local(&daemon.socket())
        .await
        .expect("connect to the local socket");
    let writer = Client::attach(channel.clone(), "writer", proto::attach::Mode::ReadWrite).await;
    let watcher = Client::attach(channel, "watcher", proto::attach::Mode::ReadOnly).await;
    for (client, is_writer) in [(&writer, true), (&watcher, false)] {
        let a = &client.attached;
        assert_eq!(
            (a.offset, a.writer, a.guest_connected),
            (0, is_writer, false),
            "attached frame of the {}: {a:?}",
            client.name
        );
    }
    const WRITER: usize = 0;
    const WATCHER: usize = 1;
    let mut scene = Scene {
        log_path: daemon.log_path(GUEST, DEVICE),
        daemon,
        qemu: None,
        clients: vec![writer, watcher],
    };

    let qemu_started = Instant::now();
    let wiring = rendered_wiring(&scene.daemon, &guest_socket);
    scene.qemu = Some(Qemu::start(&kernel, &initrd, &wiring));
    scene
        .wait("guest connected frame on both clients", DEADLINE, |s| {
            s.clients
                .iter()
                .all(|c| c.snapshot(|t| t.guest_states.first() == Some(&true)))
        })
        .await;
    let connected = qemu_started.elapsed();

    // Boot: kernel lines, then the banner of /init, then the prompt of the shell.
    scene
        .wait("kernel output on the writer", BOOT_DEADLINE, |s| {
            s.client_has(WRITER, KERNEL_LINE)
        })
        .await;
    scene
        .wait("the banner of /init on the writer", BOOT_DEADLINE, |s| {
            s.client_has(WRITER, BANNER)
        })
        .await;
    scene
        .wait("the shell prompt on the writer", BOOT_DEADLINE, |s| {
            s.client_has(WRITER, PROMPT)
        })
        .await;
    let booted = qemu_started.elapsed();

    // The watcher types first: its bytes must never reach the guest. Then the writer types.
    // The guest's shell computes the text, so only a command that ran prints "conlog-42".
    scene.clients[WATCHER]
        .type_text("echo watcher-$((7*6))\n")
        .await;
    let typed = Instant::now();
    scene.clients[WRITER]
        .type_text("echo conlog-$((6*7))\n")
        .await;
    scene
        .wait(
            "conlog-42 from the guest on the writer",
            COMMAND_DEADLINE,
            |s| s.client_has(WRITER, "conlog-42"),
        )
        .await;
    let round_trip = typed.elapsed();
    // A second command: by its answer, the watcher's earlier input would have shown up too.
    scene.clients[WRITER]
        .type_text("echo done-$((1+1))\n")
        .await;
    scene
        .wait("done-2 on both clients", COMMAND_DEADLINE, |s| {
            s.client_has(WRITER, "done-2") && s.client_has(WATCHER, "done-2")
        })
        .await;
    for client in [WRITER, WATCHER] {
        assert!(
            !scene.client_has(client, "watcher-"),
            "input of the READ_ONLY watcher reached the guest\n{}",
            scene.context()
        );
    }

    // The log holds everything both clients saw, byte for byte from offset 0; the log is
    // written before clients are served, so it is never behind them.
    let log = scene.log();
    let log_text = String::from_utf8_lossy(&log);
    for needle in [KERNEL_LINE, BANNER, PROMPT, "conlog-42", "done-2"] {
        assert!(
            log_text.contains(needle),
            "the log lacks {needle:?}\n{}",
            scene.context()
        );
    }
    for client in &scene.clients {
        client.snapshot(|t| {
            assert!(
                t.problems.is_empty() && t.ended.is_none(),
                "{} (problems or ended)\n{}",
                client.name,
                scene.context()
            );
            assert_eq!(t.start, 0, "{}", client.name);
            assert_eq!(t.next, t.data.len() as u64, "{}", client.name);
            assert!(
                log.starts_with(&t.data),
                "{} received bytes that differ from the log (first difference at offset {})\n{}",
                client.name,
                log.iter()
                    .zip(&t.data)
                    .position(|(a, b)| a != b)
                    .unwrap_or(log.len().min(t.data.len())),
                scene.context()
            );
        });
    }

    // QEMU goes away: both clients stay attached and are told; the log keeps every byte.
    scene.qemu.as_mut().unwrap().kill();
    scene
        .wait("guest disconnected frame on both clients", DEADLINE, |s| {
            s.clients
                .iter()
                .all(|c| c.snapshot(|t| t.guest_states == [true, false]))
        })
        .await;
    let total = scene.clients[WRITER].snapshot(|t| t.next);
    scene
        .wait("the watcher to catch up with the writer", DEADLINE, |s| {
            s.clients[WATCHER].snapshot(|t| t.next) == total
        })
        .await;
    let log = scene.log();
    assert_eq!(log.len() as u64, total, "{}", scene.context());
    for client in &scene.clients {
        client.snapshot(|t| {
            assert!(
                t.problems.is_empty() && t.ended.is_none(),
                "{}\n{}",
                client.name,
                scene.context()
            );
            assert!(t.data == log, "{} differs from the log", client.name);
        });
    }
    let info = scene
        .daemon
        .agent()
        .await
        .list_guests(proto::ListGuestsRequest {
            guest: GUEST.into(),
        })
        .await
        .expect("ListGuests")
        .into_inner();
    let stream = info
        .guests
        .iter()
        .flat_map(|g| &g.streams)
        .find(|s| s.name == DEVICE)
        .unwrap_or_else(|| panic!("ListGuests lacks {GUEST}/{DEVICE}: {info:?}"));
    assert_eq!(
        (stream.offset, stream.guest_connected, stream.clients),
        (total, false, 2),
        "{stream:?}"
    );

    for client in &scene.clients {
        client.task.abort();
    }
    eprintln!(
        "qemu guest: build {built:.1?}, QEMU connected after {connected:.1?}, shell prompt after \
         {booted:.1?}, command round trip {round_trip:.1?}, {total} bytes of console output, \
         test {:.1?}",
        started.elapsed()
    );
}

/// Waits (bounded by `deadline`) until `ListGuests` shows whether QEMU is connected to the
/// console; fails at once if QEMU exits.
async fn wait_qemu_connected(scene: &mut Scene, connected: bool, deadline: Duration) {
    let until = Instant::now() + deadline;
    loop {
        let listed = match conlog::client::connect_local(&scene.daemon.socket()).await {
            Ok(channel) => proto::agent_client::AgentClient::new(channel)
                .list_guests(proto::ListGuestsRequest {
                    guest: GUEST.into(),
                })
                .await
                .ok()
                .map(|r| r.into_inner()),
            Err(_) => None,
        };
        let stream = listed
            .iter()
            .flat_map(|l| &l.guests)
            .flat_map(|g| &g.streams)
            .find(|s| s.name == DEVICE)
            .cloned();
        if stream
            .as_ref()
            .is_some_and(|s| s.guest_connected == connected)
        {
            return;
        }
        if let Some(status) = scene.qemu.as_mut().and_then(Qemu::exited) {
            panic!(
                "{QEMU} exited ({status}) while waiting for guest_connected == {connected}:\n{}\n{}",
                scene.qemu.as_ref().map(Qemu::output).unwrap_or_default(),
                scene.context()
            );
        }
        if Instant::now() > until {
            panic!(
                "guest_connected != {connected} after {deadline:?} (last seen {stream:?})\nQEMU \
                 output:\n{}\n{}",
                scene.qemu.as_ref().map(Qemu::output).unwrap_or_default(),
                scene.context()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The sockets a process holds (`socket:[inode]` of each descriptor): QEMU's connection to the
/// guest socket is one of them, so a reconnect changes the set.
fn sockets_of(qemu: &Qemu) -> std::collections::BTreeSet<String> {
    let pid = qemu.child.as_ref().expect("QEMU running").id();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|target| target.starts_with("socket:"))
        .collect()
}

/// The console as `ListGuests` shows it.
async fn stream_info(daemon: &Daemon) -> proto::StreamInfo {
    let reply = daemon
        .agent()
        .await
        .list_guests(proto::ListGuestsRequest {
            guest: GUEST.into(),
        })
        .await
        .expect("ListGuests")
        .into_inner();
    reply
        .guests
        .iter()
        .flat_map(|g| &g.streams)
        .find(|s| s.name == DEVICE)
        .cloned()
        .unwrap_or_else(|| panic!("ListGuests lacks {GUEST}/{DEVICE}: {reply:?}"))
}

/// Attaches a new writer (after the previous one was ended), pushed to the scene's clients;
/// returns its index.
async fn attach_writer(scene: &mut Scene, name: &'static str) -> usize {
    let channel = conlog::client::connect_local(&scene.daemon.socket())
        .await
        .expect("connect to the local socket");
    let client = Client::attach(channel, name, proto::attach::Mode::ReadWrite).await;
    assert!(
        client.attached.writer,
        "{name} holds the writer lease: {:?}",
        client.attached
    );
    scene.clients.push(client);
    scene.clients.len() - 1
}

/// Types `command` (whose output the guest's shell computes) on client `index` and waits for
/// `answer` on it.
async fn run_command(scene: &mut Scene, index: usize, command: &str, answer: &str) {
    scene.clients[index]
        .type_text(&format!("{command}\n"))
        .await;
    scene
        .wait(
            &format!("{answer} from the guest on {}", scene.clients[index].name),
            COMMAND_DEADLINE,
            |s| s.client_has(index, answer),
        )
        .await;
}

/// A real QEMU guest through an in-place upgrade and a crash of conlogd:
/// - SIGUSR1 while QEMU runs: the attached client ends with UNAVAILABLE, a new one attaches
///   and the shell still answers; QEMU's connection was carried (conlogd never saw it
///   disconnect nor connect again, QEMU printed nothing) and the log goes on.
/// - `kill -9` and a restart on the same directories: the descriptor keeper held QEMU's
///   connection through the crash, so QEMU keeps the very same socket (it never reconnects), a
///   client sees the guest connected and a typed command's output, and the log continues after
///   the crash at the offset where it stopped (docs/operations.md, "Crash guarantees").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_keeps_its_console_connection_through_an_upgrade_and_a_crash() {
    let started = Instant::now();
    require_qemu();
    let _one = one_guest_at_a_time().await;
    let (kernel, initrd) = build_guest().await;

    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = agent
        .create_console(proto::CreateConsoleRequest {
            guest: GUEST.into(),
            device: DEVICE.into(),
            limits: None,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("CreateConsole: {s:?}"))
        .into_inner();
    drop(agent);
    let guest_socket = PathBuf::from(&console.guest_socket);
    let mut scene = Scene {
        log_path: daemon.log_path(GUEST, DEVICE),
        daemon,
        qemu: None,
        clients: Vec::new(),
    };
    let first = attach_writer(&mut scene, "first writer").await;
    let wiring = rendered_wiring(&scene.daemon, &guest_socket);
    scene.qemu = Some(Qemu::start(&kernel, &initrd, &wiring));
    scene
        .wait("the shell prompt", BOOT_DEADLINE, |s| {
            s.client_has(first, PROMPT)
        })
        .await;
    run_command(&mut scene, first, "echo before-$((2*3))", "before-6").await;
    let booted = started.elapsed();

    // In-place upgrade while QEMU runs.
    let qemu_output = scene.qemu.as_ref().unwrap().output();
    let qemu_sockets = sockets_of(scene.qemu.as_ref().unwrap());
    assert!(!qemu_sockets.is_empty(), "QEMU holds its chardev socket");
    scene.daemon.signal(rustix::process::Signal::USR1);
    scene
        .wait("the first writer ended by the upgrade", DEADLINE, |s| {
            s.clients[first].snapshot(|t| t.ended.is_some())
        })
        .await;
    let ended = scene.clients[first].snapshot(|t| t.ended.clone().unwrap());
    assert!(
        ended.contains("Unavailable"),
        "{ended}\n{}",
        scene.context()
    );
    scene
        .wait("the upgraded daemon's ready line", DEADLINE, |s| {
            s.daemon.stderr().matches("conlogd ready").count() == 2
        })
        .await;
    let upgraded = attach_writer(&mut scene, "writer after the upgrade").await;
    assert!(
        scene.clients[upgraded].attached.guest_connected,
        "QEMU's connection was carried across the upgrade: {:?}\n{}",
        scene.clients[upgraded].attached,
        scene.context()
    );
    run_command(&mut scene, upgraded, "echo upgraded-$((3*3))", "upgraded-9").await;
    let diagnostics = scene.daemon.stderr();
    assert_eq!(
        (
            diagnostics.matches("guest connected").count(),
            diagnostics.matches("guest disconnected").count()
        ),
        (1, 0),
        "QEMU did not reconnect across the upgrade\n{}",
        scene.context()
    );
    assert_eq!(
        scene.qemu.as_ref().unwrap().output(),
        qemu_output,
        "QEMU noticed nothing of the upgrade"
    );
    assert_eq!(
        sockets_of(scene.qemu.as_ref().unwrap()),
        qemu_sockets,
        "QEMU still holds the connection it had before the upgrade"
    );
    assert!(
        scene.clients[upgraded].snapshot(|t| t.guest_states.is_empty() && t.problems.is_empty()),
        "{}",
        scene.context()
    );

    // Crash and restart: QEMU's connection outlives the daemon.
    let before_crash = scene.log().len() as u64;
    scene.daemon.kill().await;
    let killed = Instant::now();
    scene.daemon.restart().await;
    let restarted = stream_info(&scene.daemon).await;
    // The offset continues from the file; what the guest printed while the daemon was down
    // waited in the kept connection and is logged after it (so the offset may be further on).
    assert!(
        restarted.offset >= before_crash,
        "the offset continues from the file: {restarted:?}\n{}",
        scene.context()
    );
    wait_qemu_connected(&mut scene, true, BOOT_DEADLINE).await;
    let reconnected = killed.elapsed();
    assert_eq!(
        sockets_of(scene.qemu.as_ref().unwrap()),
        qemu_sockets,
        "QEMU keeps the connection it had before the crash (the keeper held it)"
    );
    assert_eq!(
        scene.qemu.as_ref().unwrap().output(),
        qemu_output,
        "QEMU noticed nothing of the crash"
    );
    let after = attach_writer(&mut scene, "writer after the crash").await;
    run_command(&mut scene, after, "echo back-$((4*4))", "back-16").await;

    // The log holds the whole story in order, offsets continuing across the crash.
    let log = scene.log();
    let text = String::from_utf8_lossy(&log);
    let positions: Vec<Option<usize>> = [PROMPT, "before-6", "upgraded-9", "back-16"]
        .iter()
        .map(|needle| text.find(needle))
        .collect();
    assert!(
        positions.iter().all(Option::is_some) && positions.windows(2).all(|w| w[0] < w[1]),
        "the log lacks something or has it out of order: {positions:?}\n{}",
        scene.context()
    );
    assert!(
        contains(&log[..before_crash as usize], b"upgraded-9")
            && contains(&log[before_crash as usize..], b"back-16"),
        "the log written after the restart continues at offset {before_crash}\n{}",
        scene.context()
    );
    let total = log.len() as u64;
    let client_end = scene.clients[after].snapshot(|t| t.next);
    assert!(client_end <= total, "{}", scene.context());
    scene.clients[after].snapshot(|t| {
        let start = t.start as usize;
        assert!(
            log[start..].starts_with(&t.data),
            "the client after the crash received bytes that differ from the log\n{}",
            scene.context()
        );
        assert!(t.problems.is_empty(), "{}", scene.context());
    });
    for client in &scene.clients {
        client.task.abort();
    }
    eprintln!(
        "qemu through an upgrade and a crash: booted and ran a command after {booted:.1?}, \
         the guest was served again {reconnected:.1?} after the kill, {total} bytes logged, test {:.1?}",
        started.elapsed(),
    );
}

/// A serial BREAK reaches a real guest (docs/consoles.md, "Serial BREAK"): the console is created
/// with the mux protocol, QEMU boots with what `conlogctl create-console --print qemu-legacy`
/// renders for it (`mux=on`), and after `echo 1 > /proc/sys/kernel/sysrq` a BREAK followed by
/// `h` makes the kernel print the SysRq help on the console. Through the mux, the log stays
/// exactly what the guest printed, and keys that are QEMU's mux commands (`Ctrl-A x` quits
/// QEMU, `Ctrl-A h` prints QEMU's help) reach the guest as typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_break_makes_a_real_guest_show_the_sysrq_help() {
    require_qemu();
    let _one = one_guest_at_a_time().await;
    let (kernel, initrd) = build_guest().await;
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = agent
        .create_console(proto::CreateConsoleRequest {
            guest: GUEST.into(),
            device: DEVICE.into(),
            protocol: proto::ConsoleProtocol::Mux as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("CreateConsole: {s:?}"))
        .into_inner();
    drop(agent);
    let guest_socket = PathBuf::from(&console.guest_socket);
    let wiring = rendered_wiring(&daemon, &guest_socket);
    assert!(
        wiring.iter().any(|a| a.contains(",mux=on,")),
        "the existing console's protocol is rendered: {wiring:?}"
    );
    let mut scene = Scene {
        log_path: daemon.log_path(GUEST, DEVICE),
        daemon,
        qemu: None,
        clients: Vec::new(),
    };
    let writer = attach_writer(&mut scene, "writer").await;
    assert!(
        scene.clients[writer].attached.serial_break,
        "{:?}",
        scene.clients[writer].attached
    );
    scene.qemu = Some(Qemu::start(&kernel, &initrd, &wiring));
    scene
        .wait("the shell prompt", BOOT_DEADLINE, |s| {
            s.client_has(writer, PROMPT)
        })
        .await;
    run_command(
        &mut scene,
        writer,
        "echo 1 > /proc/sys/kernel/sysrq; echo sysrq-$(cat /proc/sys/kernel/sysrq)-on",
        "sysrq-1-on",
    )
    .await;

    // Guest output with Ctrl-A and 0xFF: logged as printed.
    run_command(
        &mut scene,
        writer,
        r"printf 'ctl:\001x\001b\377:end-%d\n' $((5*5))",
        "end-25",
    )
    .await;
    // QEMU's mux commands typed: the guest reads them as keys (od shows 01 78 01 68 0a), and
    // QEMU neither quits nor prints its help.
    scene.clients[writer]
        .type_bytes(b"head -c 5 | od -An -tx1\n")
        .await;
    scene.clients[writer].type_bytes(b"\x01x\x01h\n").await;
    scene
        .wait("od's dump of the typed keys", COMMAND_DEADLINE, |s| {
            s.client_has(writer, "01 78 01 68 0a")
        })
        .await;

    // BREAK, then h: the SysRq help.
    scene.clients[writer].send_break().await;
    scene.clients[writer].type_bytes(b"h").await;
    scene
        .wait("the SysRq help after BREAK h", COMMAND_DEADLINE, |s| {
            s.client_has(writer, "sysrq: HELP")
        })
        .await;
    // The shell did not get the h: the next command runs alone.
    run_command(&mut scene, writer, "echo after-$((6*6))", "after-36").await;

    let log = scene.log();
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("sysrq: HELP"), "{}", scene.context());
    assert!(
        contains(&log, b"ctl:\x01x\x01b\xff:end-25"),
        "the guest's bytes are logged as printed\n{}",
        scene.context()
    );
    assert!(
        !text.contains("C-a h") && !text.contains("QEMU: Terminated"),
        "a typed key ran a QEMU mux command\n{}",
        scene.context()
    );
    assert!(scene.qemu.as_mut().unwrap().exited().is_none(), "QEMU runs");
    scene.clients[writer].snapshot(|t| {
        assert!(t.problems.is_empty(), "{}", scene.context());
        assert!(
            log.starts_with(&t.data),
            "the client received what the log holds\n{}",
            scene.context()
        );
    });
    for client in &scene.clients {
        client.task.abort();
    }
}

/// Why a BREAK needs `mux=on` (docs/consoles.md, "Serial BREAK"): QEMU's socket chardev as a
/// client ignores `telnet=on`. It sends no option negotiation (the log starts with the guest's
/// own output) and passes `IAC IAC` and `IAC BREAK` to the guest as plain bytes, so telnet
/// cannot carry a BREAK to a QEMU that connects to conlogd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_as_a_client_ignores_telnet() {
    require_qemu();
    let _one = one_guest_at_a_time().await;
    let (kernel, initrd) = build_guest().await;
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = agent
        .create_console(proto::CreateConsoleRequest {
            guest: GUEST.into(),
            device: DEVICE.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("CreateConsole: {s:?}"))
        .into_inner();
    drop(agent);
    let guest_socket = PathBuf::from(&console.guest_socket);
    let wiring: Vec<String> = rendered_wiring(&daemon, &guest_socket)
        .into_iter()
        .map(|arg| arg.replace(",reconnect=1", ",telnet=on,reconnect=1"))
        .collect();
    assert!(
        wiring.iter().any(|a| a.contains(",telnet=on,")),
        "{wiring:?}"
    );
    let mut scene = Scene {
        log_path: daemon.log_path(GUEST, DEVICE),
        daemon,
        qemu: None,
        clients: Vec::new(),
    };
    let writer = attach_writer(&mut scene, "writer").await;
    scene.qemu = Some(Qemu::start(&kernel, &initrd, &wiring));
    scene
        .wait("the shell prompt", BOOT_DEADLINE, |s| {
            s.client_has(writer, PROMPT)
        })
        .await;
    scene.clients[writer]
        .type_bytes(b"head -c 6 | od -An -tx1\n")
        .await;
    scene.clients[writer]
        .type_bytes(b"\xff\xff\xff\xf3A\n")
        .await;
    scene
        .wait("od's dump of the typed bytes", COMMAND_DEADLINE, |s| {
            s.client_has(writer, "ff ff ff f3 41 0a")
        })
        .await;
    let log = scene.log();
    assert!(
        !log.starts_with(&[255]),
        "QEMU sent telnet options: {:?}",
        &log[..log.len().min(16)]
    );
    for client in &scene.clients {
        client.task.abort();
    }
}
