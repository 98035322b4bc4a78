//! The command lines as people meet them: conlogctl refuses flags that do not apply, lists guests
//! as JSON for scripts, both binaries ship man pages and completions through deploy/install.sh,
//! and conlogd colours its log only on a terminal (and never with NO_COLOR).
//!
//! Needs nothing but the binaries and util-linux's `script` (a terminal for the colour check).

use crate::support;
use crate::upgrade_common;
use std::path::Path;
use std::process::{Command, Stdio};
use support::*;

fn conlogctl(daemon: &Daemon) -> Command {
    let mut cmd = Command::new(conlogctl_bin());
    cmd.arg("--socket").arg(daemon.socket());
    cmd
}

/// `--server`, `--token`, `--ca` and `--cert` only work for console and history: elsewhere they
/// are a usage error (status 2) naming the flag, not silently ignored.
#[test]
fn connection_flags_are_refused_where_they_do_not_apply() {
    for (args, flag) in [
        (
            &["--server", "http://127.0.0.1:1", "guests"][..],
            "--server",
        ),
        (&["--token", "abc", "remove", "vm1"][..], "--token"),
        (
            &["upgrade", "--server", "http://127.0.0.1:1"][..],
            "--server",
        ),
        (&["--ca", "/x.pem", "token", "vm1"][..], "--ca"),
    ] {
        let out = run_bounded(Command::new(conlogctl_bin()).args(args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        assert!(
            stderr.contains(flag) && stderr.contains("only applies to `console` and `history`"),
            "{args:?}: {stderr}"
        );
    }
    let out = run_bounded(Command::new(conlogctl_bin()).args([
        "--socket",
        "/nonexistent/conlogd.sock",
        "--server",
        "http://127.0.0.1:1",
        "history",
        "vm1",
    ]));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--socket and --server"),
        "{}",
        describe(&out)
    );
}

/// Help texts show each default once, in clap's form, and conlogd's names its signals and
/// environment.
#[test]
fn help_texts_name_defaults_signals_and_environment() {
    let help = |bin: &str, args: &[&str]| {
        let out = run_bounded(Command::new(bin).args(args));
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
        String::from_utf8(out.stdout).expect("help is UTF-8")
    };
    let run = help(conlogctl_bin(), &["run", "--help"]);
    assert!(run.contains("[default: qemu]"), "{run}");
    assert!(!run.contains("(default \"qemu\")"), "{run}");
    let console = help(conlogctl_bin(), &["console", "--help"]);
    assert!(console.contains("[default: serial0]"), "{console}");
    let top = help(conlogctl_bin(), &["--help"]);
    assert!(top.starts_with("Command line of conlogd"), "{top}");
    assert!(top.contains("Usage: conlogctl"), "{top}");
    assert!(top.contains("Connection:"), "global flags apart: {top}");
    assert!(top.contains("<runtime_dir> is"), "{top}");
    let daemon = help(conlogd_bin(), &["--help"]);
    for word in ["SIGUSR1", "SIGHUP", "SIGTERM", "RUST_LOG", "NO_COLOR"] {
        assert!(
            daemon.contains(word),
            "conlogd --help lacks {word}: {daemon}"
        );
    }
}

/// `guests -o json` gives every stream's fields as JSON; the default is the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_as_json_for_scripts() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, "vm-json", "qemu", None).await;
    write_and_close(pipe, b"hello\n".to_vec()).await;
    wait_closed(&mut agent, "vm-json", "qemu", 6).await;
    create_console(&mut agent, "vm-json", "serial0", None)
        .await
        .expect("create the console");

    let out = run_bounded(conlogctl(&daemon).args(["guests", "-o", "json"]));
    assert!(out.status.success(), "{}", describe(&out));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&out)));
    let guests = value["guests"].as_array().expect("a guests array");
    assert_eq!(guests.len(), 1, "{value}");
    assert_eq!(guests[0]["name"], "vm-json");
    let streams = guests[0]["streams"].as_array().expect("a streams array");
    let find = |name: &str| {
        streams
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no stream {name}: {value}"))
    };
    let pipe = find("qemu");
    assert_eq!(pipe["kind"], "pipe");
    assert_eq!(pipe["state"], "closed");
    assert_eq!(pipe["offset"], 6);
    assert_eq!(pipe["open"], false);
    assert_eq!(pipe["mode"], "rotate");
    assert_eq!(pipe["dropped_bytes"], 0);
    assert!(
        pipe["log_path"]
            .as_str()
            .is_some_and(|p| p.ends_with("qemu.log")),
        "{pipe}"
    );
    let console = find("serial0");
    assert_eq!(console["kind"], "console");
    assert_eq!(console["state"], "waiting");
    assert_eq!(console["guest_connected"], false);
    assert_eq!(console["clients"], 0);

    let table = run_bounded(conlogctl(&daemon).args(["guests"]));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("GUEST"), "{text}");
    assert!(text.contains("vm-json"), "{text}");
    daemon.stop().await;
}

/// deploy/install.sh (with DESTDIR) installs the binaries, man pages for every command of both
/// binaries, and bash/zsh/fish completions that know the commands.
#[test]
fn install_script_ships_man_pages_and_completions() {
    let root = tempfile::tempdir().expect("temp dir");
    let bin_dir = Path::new(conlogd_bin()).parent().expect("binary directory");
    let out = run_bounded(
        Command::new("sh")
            .arg(repo_dir().join("deploy/install.sh"))
            .arg(bin_dir)
            .env("DESTDIR", root.path())
            .env("PREFIX", "/usr"),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let at = |path: &str| root.path().join(path.trim_start_matches('/'));
    for bin in ["conlogd", "conlogctl"] {
        assert!(at(&format!("/usr/bin/{bin}")).is_file(), "{bin} installed");
    }
    let man = std::fs::read_to_string(at("/usr/share/man/man1/conlogctl.1")).expect("man page");
    assert!(man.contains(".TH conlogctl 1"), "{man}");
    for command in ["console", "history", "guests", "run", "token", "remove"] {
        let page = at(&format!("/usr/share/man/man1/conlogctl-{command}.1"));
        assert!(page.is_file(), "no man page for conlogctl {command}");
    }
    let daemon_man =
        std::fs::read_to_string(at("/usr/share/man/man1/conlogd.1")).expect("conlogd man page");
    assert!(daemon_man.contains("SIGUSR1"), "{daemon_man}");
    assert!(
        !at("/usr/share/man/man1/conlogd-man.1").exists(),
        "the packaging commands are hidden"
    );
    let bash = std::fs::read_to_string(at("/usr/share/bash-completion/completions/conlogctl"))
        .expect("bash completion");
    assert!(
        bash.contains("complete -F _conlogctl") && bash.contains("create-console"),
        "{bash}"
    );
    assert!(at("/usr/share/zsh/site-functions/_conlogctl").is_file());
    assert!(at("/usr/share/fish/vendor_completions.d/conlogd.fish").is_file());
    let unit = std::fs::read_to_string(at("/etc/systemd/system/conlogd.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/conlogd"), "{unit}");
    assert!(at("/etc/tmpfiles.d/conlog.conf").is_file());
}

/// What conlogd printed until it said it was ready, run with `env` and its stderr on a pipe
/// (`terminal` false) or on a terminal (util-linux `script` gives it a pseudo-terminal).
async fn startup_log(env: &[(&str, &str)], terminal: bool) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let typescript = dir.path().join("typescript");
    let conlogd = format!(
        "{} --runtime-dir {} --data-dir {} --listen 127.0.0.1:0 --metrics 127.0.0.1:0",
        conlogd_bin(),
        dir.path().join("run").display(),
        dir.path().join("data").display()
    );
    let mut command = if terminal {
        let mut cmd = Command::new("script");
        // `exec`: whatever $SHELL runs the command (bash execs a lone command by itself, dash
        // does not), conlogd is script's child, the process the test signals.
        cmd.args(["-q", "-f", "-e", "-c", &format!("exec {conlogd}")])
            .arg(&typescript)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    } else {
        let mut cmd = Command::new("sh");
        let file = std::fs::File::create(&typescript).expect("log file");
        cmd.args(["-c", &format!("exec {conlogd}")])
            .stdout(Stdio::null())
            .stderr(file);
        cmd
    };
    command.env_remove("NO_COLOR").env("RUST_LOG", "info");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.stdin(Stdio::null()).spawn().expect("spawn");
    let deadline = std::time::Instant::now() + DEADLINE;
    let text = loop {
        let text = std::fs::read_to_string(&typescript).unwrap_or_default();
        if text.contains("ready") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "conlogd not ready: {text}"
        );
        tokio::time::sleep(POLL).await;
    };
    // The daemon is the child (sh execs it) or the child's child (under script).
    let pid = if terminal {
        let children = format!("/proc/{0}/task/{0}/children", child.id());
        std::fs::read_to_string(children).expect("script's children")
    } else {
        child.id().to_string()
    };
    for pid in pid.split_whitespace() {
        let pid = rustix::process::Pid::from_raw(pid.parse().expect("a pid")).expect("pid > 0");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}: {text}");
    text
}

/// The daemon's log has colour codes only on a terminal: a pipe (journald, files) gets plain
/// text, and NO_COLOR turns colour off on a terminal too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_is_coloured_only_on_a_terminal() {
    const ESC: char = '\u{1b}';
    let piped = startup_log(&[], false).await;
    assert!(!piped.contains(ESC), "colour codes on a pipe: {piped:?}");
    let terminal = startup_log(&[], true).await;
    assert!(
        terminal.contains(&format!("{ESC}[")),
        "no colour on a terminal: {terminal:?}"
    );
    let no_color = startup_log(&[("NO_COLOR", "1")], true).await;
    assert!(
        !no_color.contains(ESC),
        "colour despite NO_COLOR: {no_color:?}"
    );
}

/// `<runtime_dir>/conlogd.pid` names the serving daemon: written when it serves, the same
/// after an in-place upgrade, the successor's after a takeover, gone after a clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pid_file_names_the_serving_daemon() {
    let mut daemon = Daemon::start().await;
    let pid_file = daemon.runtime_dir().join("conlogd.pid");
    let read = || std::fs::read_to_string(&pid_file).unwrap_or_default();
    assert_eq!(read(), format!("{}\n", daemon.pid()));

    daemon.signal(rustix::process::Signal::USR1);
    upgrade_common::wait_ready_count("the upgrade", 2, || daemon.stderr()).await;
    assert_eq!(
        read(),
        format!("{}\n", daemon.pid()),
        "same pid after SIGUSR1"
    );

    let mut successor = upgrade_common::Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
    successor.wait_ready().await;
    assert_eq!(daemon.wait_exit().await.code(), Some(0));
    successor.assert_took_over();
    assert_eq!(
        read(),
        format!("{}\n", successor.pid()),
        "the successor's pid"
    );

    assert_eq!(successor.stop().await.code(), Some(0));
    assert!(!pid_file.exists(), "a clean stop removes the pid file");
}

/// `ListGuests` (and `conlogctl guests`) name who holds a console's writer lease and who is
/// attached: a local gRPC writer by pid and uid, a raw `client.sock` watcher by pid and uid, a
/// remote watcher by address and its token's access. Detaching shows at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_name_the_writer_and_the_attached_clients() {
    use conlog::proto::attach::Mode;
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, "vm-who").await;
    let me = std::process::id();
    let uid = rustix::process::getuid().as_raw();

    let writer = Session::attach(
        local_channel(&daemon).await,
        attach("vm-who", Mode::ReadWrite),
    )
    .await
    .expect("local writer");
    wait_clients(&mut agent, "vm-who", "serial0", 1).await;
    // A raw client asks for the lease if free: it is held, so this one watches.
    let raw = tokio::net::UnixStream::connect(&console.client_socket)
        .await
        .expect("client.sock");
    wait_clients(&mut agent, "vm-who", "serial0", 2).await;
    let token = daemon
        .token("vm-who", "", conlog::proto::Access::Read, 600)
        .await;
    let remote = Session::attach(
        with_token(daemon.plain_tcp_channel().await, &token),
        attach("vm-who", Mode::ReadOnly),
    )
    .await
    .expect("remote watcher");
    let info = wait_clients(&mut agent, "vm-who", "serial0", 3).await;

    assert_eq!(
        info.writer,
        format!("grpc local pid {me} uid {uid}"),
        "{info:?}"
    );
    assert_eq!(info.attached.len(), 3, "{info:?}");
    assert_eq!(info.attached[0], info.writer, "in attach order: {info:?}");
    assert_eq!(info.attached[1], format!("client.sock pid {me} uid {uid}"));
    assert!(
        info.attached[2].starts_with("grpc 127.0.0.1:")
            && info.attached[2].ends_with(" token read"),
        "{info:?}"
    );

    let out = run_bounded(conlogctl(&daemon).args(["guests", "vm-who", "-o", "json"]));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let stream = &value["guests"][0]["streams"][0];
    assert_eq!(stream["writer"], info.writer.as_str(), "{value}");
    assert_eq!(
        stream["attached"].as_array().map(Vec::len),
        Some(3),
        "{value}"
    );
    let table = run_bounded(conlogctl(&daemon).args(["guests", "vm-who"]));
    let text = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        text.contains(&format!("    writer:  grpc local pid {me} uid {uid}\n")),
        "{text}"
    );
    assert_eq!(text.matches("    watcher: ").count(), 2, "{text}");

    // The writer leaves: nobody holds the lease, two watchers remain.
    drop(writer);
    let info = wait_clients(&mut agent, "vm-who", "serial0", 2).await;
    assert_eq!(info.writer, "", "{info:?}");
    assert_eq!(info.attached.len(), 2, "{info:?}");
    drop((raw, remote));
    daemon.stop().await;
}

/// `create-console --print` renders what connects a guest's serial port to the console: the
/// path, QEMU's arguments in both spellings (`reconnect-ms=` from 9.2, `reconnect=` before), and
/// a libvirt `<serial>` element on port N for `serialN` — all naming the socket conlogd made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_console_prints_the_qemu_and_libvirt_wiring() {
    let mut daemon = Daemon::start().await;
    let print = |device: &str, what: &str| {
        let out = run_bounded(conlogctl(&daemon).args([
            "create-console",
            "vm-wire",
            "--device",
            device,
            "--print",
            what,
        ]));
        assert!(out.status.success(), "{}", describe(&out));
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    let path = print("serial1", "path");
    let path = path.trim_end();
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, "vm-wire", "serial1")
        .await
        .expect("the console exists");
    assert_eq!(info.kind, conlog::proto::StreamKind::Console as i32);
    assert!(
        path.ends_with("/consoles/vm-wire/serial1.guest.sock"),
        "{path}"
    );
    assert_socket(path);
    assert_eq!(
        print("serial1", "qemu"),
        format!(
            "-chardev socket,id=conlog-serial1,path={path},reconnect-ms=1000 \
             -serial chardev:conlog-serial1\n"
        )
    );
    assert_eq!(
        print("serial1", "qemu-legacy"),
        format!(
            "-chardev socket,id=conlog-serial1,path={path},reconnect=1 \
             -serial chardev:conlog-serial1\n"
        )
    );
    assert_eq!(
        print("serial1", "libvirt"),
        format!(
            "<serial type='unix'>\n  <source mode='connect' path='{path}'>\n    \
             <reconnect enabled='yes' timeout='1'/>\n  </source>\n  \
             <target port='1'/>\n</serial>\n"
        )
    );
    assert!(print("serial0", "libvirt").contains("<target port='0'/>"));

    // A mux console (serial BREAK): created with --mux, rendered with mux=on also when shown
    // again without it; libvirt's <serial> cannot say mux=on, so that is refused with what to do.
    let mux = |args: &[&str]| {
        run_bounded(
            conlogctl(&daemon)
                .args(["create-console", "vm-wire", "--device", "serial2"])
                .args(args),
        )
    };
    let created = mux(&["--mux", "--print", "qemu"]);
    assert!(created.status.success(), "{}", describe(&created));
    let text = String::from_utf8(created.stdout).expect("UTF-8");
    assert!(
        text.starts_with("-chardev socket,id=conlog-serial2,path=")
            && text.contains("serial2.guest.sock,mux=on,reconnect-ms=1000 "),
        "{text}"
    );
    let again = mux(&["--print", "qemu-legacy"]);
    let text = String::from_utf8(again.stdout).expect("UTF-8");
    assert!(text.contains(",mux=on,reconnect=1 "), "{text}");
    let libvirt = mux(&["--print", "libvirt"]);
    assert_eq!(libvirt.status.code(), Some(1), "{}", describe(&libvirt));
    let error = String::from_utf8_lossy(&libvirt.stderr);
    assert!(
        error.contains("mux") && error.contains("chardev-send-break"),
        "{error}"
    );
    let nothing = run_bounded(conlogctl(&daemon).args([
        "create-console",
        "vm-wire",
        "--device",
        "serial3",
        "--mux",
        "--print",
        "libvirt",
    ]));
    assert_eq!(nothing.status.code(), Some(1), "{}", describe(&nothing));
    assert!(
        String::from_utf8_lossy(&nothing.stderr).contains("no console was created"),
        "{}",
        describe(&nothing)
    );
    assert!(
        find_stream(&mut agent, "vm-wire", "serial3")
            .await
            .is_none(),
        "--mux --print libvirt creates nothing"
    );
    // serial1 stays raw: asking it for mux is refused.
    let refused = run_bounded(conlogctl(&daemon).args([
        "create-console",
        "vm-wire",
        "--device",
        "serial1",
        "--mux",
    ]));
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("remove the guest"),
        "{}",
        describe(&refused)
    );
    daemon.stop().await;
}
