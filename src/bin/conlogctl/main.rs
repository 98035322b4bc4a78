//! `conlogctl`: the command line of conlogd.

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use conlog::names;
use conlog::proto::{self, agent_client::AgentClient, console_client::ConsoleClient};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use tonic::transport::{Channel, Endpoint};

mod terminal;
mod times;

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  done (console: the user left with Ctrl-] and a key other than b, or piped input ended)
  1  error (an argument conlogd rejects, cannot connect at start, I/O error)
  2  usage error (command line)
  3  refused by conlogd (token, permission, unknown guest or device, writer lease held, a limit)
  4  lost: the connection to conlogd broke and did not come back within 60 s
     (console and history reconnect and resume by offset until then)
  5  revoked: another client took the console's writer lease (attach with --force to take it back)
  `run` exits with its command's status.

Terminal safety: output shown again (the console's replay, output missed while reconnecting,
history printed on a terminal) has the escape sequences that make a terminal answer (cursor
position and device attribute queries, colour queries, ...) removed, so the terminal never types
answers into the guest or the shell. Live console output and history to a pipe or file are
byte-exact.

Guests that move: when the guest live-migrates to another node, `console` and `history`
(--follow) print `[conlog: guest moved to HOST:PORT; following]` on stderr and continue on that
node with the same token and TLS settings (--ca, --cert) from the offset they had reached,
every byte once; `console` keeps the writer lease it held. At most 4 moves per run; two nodes
naming each other at the same offset is an error (status 3) naming both. Over the local
socket (no --server) a move is an error saying how to continue on the new node.";

/// How conlogctl ends (its exit status; see [`EXIT_STATUS_HELP`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Refused = 3,
    Lost = 4,
    Revoked = 5,
}

/// An error with its own exit status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    exit: Exit,
    message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: String) -> Self {
        Self { exit, message }
    }
}

/// A status answering a request: refused by conlogd (status 3) when it denies the caller or
/// the target (token, permission, unknown guest, lease held, a limit); other statuses (a bad
/// argument) are plain errors (status 1).
pub fn refused(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    match status.code() {
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::ResourceExhausted => Failure::new(Exit::Refused, status_text(&status)).into(),
        _ => status_error(status),
    }
}

/// Command line of conlogd: log pipes, guests, consoles and history.
///
/// Every command talks to conlogd's local socket, except `console` and `history`, which reach
/// the Console service over TCP instead when given --server.
#[derive(Parser)]
#[command(name = "conlogctl", version, about, after_help = EXIT_STATUS_HELP)]
struct Args {
    /// conlogd's local socket [default: <runtime_dir>/conlogd.sock, where <runtime_dir> is
    /// conlogd's runtime directory (`runtime_dir` in its configuration, /run/conlog by default,
    /// $XDG_RUNTIME_DIR/conlog when not root)].
    #[arg(long, global = true, help_heading = "Connection")]
    socket: Option<PathBuf>,
    /// Reach the Console service over TCP instead, e.g. https://node1:7770 (`console` and
    /// `history` only; every other command is local).
    #[arg(long, global = true, help_heading = "Connection")]
    server: Option<String>,
    /// Token for --server (sent as `authorization: Bearer <token>`; see `conlogctl token`).
    #[arg(long, global = true, help_heading = "Connection")]
    token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate, for an https:// --server.
    #[arg(long, global = true, help_heading = "Connection")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) for a server that requires mutual TLS; needs --key.
    #[arg(long, global = true, requires = "key", help_heading = "Connection")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, global = true, requires = "cert", help_heading = "Connection")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD with its stdout and stderr going into a log pipe; exit with CMD's status.
    Run {
        /// Guest name.
        #[arg(long)]
        guest: String,
        /// Stream name.
        #[arg(long, default_value = names::DEFAULT_PIPE_STREAM)]
        stream: String,
        /// Override the stream's file size cap (bytes).
        #[arg(long)]
        max_size: Option<u64>,
        /// Override the number of rotated files kept.
        #[arg(long)]
        max_backups: Option<u32>,
        /// Truncate instead of rotating.
        #[arg(long)]
        truncate: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List guests and their streams with offsets and sizes.
    Guests {
        /// Only this guest.
        guest: Option<String>,
        /// Output format: a table for people, or JSON (one object with a `guests` array, the
        /// fields of the ListGuests reply) for scripts.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Create (or show) a console; prints the socket path QEMU connects to, or the QEMU
    /// arguments or libvirt XML that connect a serial port to it.
    CreateConsole {
        /// Guest name.
        guest: String,
        /// Console device (serialN is the guest's Nth serial port in the XML).
        #[arg(long, default_value = names::DEFAULT_CONSOLE_DEVICE)]
        device: String,
        /// What to print: the guest socket's path; QEMU's -chardev/-serial arguments (`qemu`:
        /// QEMU 9.2 and later, reconnect-ms=; `qemu-legacy`: before 9.2, reconnect=); or a
        /// libvirt <serial> element for the domain's <devices>.
        #[arg(long, value_enum, default_value = "path")]
        print: Wiring,
        /// QEMU's chardev has mux=on, so that the console can send a serial BREAK (magic
        /// SysRq): conlogd escapes Ctrl-A in input and sends Ctrl-A b for a break. Fixed when the
        /// console is created; --print renders it.
        #[arg(long)]
        mux: bool,
    },
    /// Attach to a console: a raw terminal, or stdin's bytes when it is a pipe. Keys after
    /// Ctrl-]: b sends a serial BREAK (magic SysRq; consoles created with --mux), any other
    /// key leaves.
    Console {
        /// Guest name.
        guest: String,
        /// Console device.
        #[arg(long, default_value = names::DEFAULT_CONSOLE_DEVICE)]
        device: String,
        /// Watch without taking the writer lease.
        #[arg(long)]
        read_only: bool,
        /// Take the writer lease from its holder.
        #[arg(long)]
        force: bool,
        /// Recent output to show first, in bytes.
        #[arg(long, default_value_t = 4096)]
        replay: u64,
        /// With a pipe on stdin: how long to keep printing output after its end (e.g. 1s, 500ms).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        drain: std::time::Duration,
    },
    /// Print a stream's history (raw bytes) to stdout.
    History {
        /// Guest name.
        guest: String,
        /// Stream or device [default: serial0 if the guest has that console, else qemu].
        #[arg(long, default_value = "", hide_default_value = true)]
        stream: String,
        /// Start this many bytes before the end.
        #[arg(long, conflicts_with_all = ["tail_lines", "from", "since"])]
        tail_bytes: Option<u64>,
        /// Start this many lines before the end.
        #[arg(long, conflicts_with_all = ["from", "since"])]
        tail_lines: Option<u64>,
        /// Start at this absolute offset.
        #[arg(long, conflicts_with = "since")]
        from: Option<u64>,
        /// Start at the first byte logged at or after this time: a duration back from now
        /// (10m, 2h, 1d) or an RFC 3339 time (2026-12-05T03:00:00Z; the seconds may be left
        /// out). Times are known to the time index's resolution (100 ms while output flows,
        /// 1 s otherwise). Needs a conlogd with the time index.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// Stop before the first byte logged after this time (same forms as --since); with
        /// --follow, stop when the clock passes it.
        #[arg(long, value_name = "WHEN")]
        until: Option<String>,
        /// Prefix each line with the time it was logged, RFC 3339 in UTC with nanoseconds
        /// (`2026-12-05T03:12:07.123456789Z `, like kubectl logs --timestamps); `~` before the
        /// time marks one recorded while the wall clock was behind (stepped back); `-` where
        /// the time is unknown (bytes logged before the time index existed).
        #[arg(long)]
        timestamps: bool,
        /// Show what happened to the stream (guest connected or disconnected, writer changed,
        /// conlogd started, upgraded or stopped, bytes dropped, clock stepped) in order with
        /// the bytes, as `[conlog: TIME what (detail)]` lines: on stderr (default), or inline
        /// in the output (--events=inline).
        #[arg(long, value_enum, value_name = "WHERE", num_args = 0..=1, require_equals = true,
              default_missing_value = "stderr")]
        events: Option<EventsTo>,
        /// Keep printing new output, like tail -f.
        #[arg(short, long)]
        follow: bool,
        /// Stop after this many bytes.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Issue a token for a remote console client; prints it.
    Token {
        /// Guest name.
        guest: String,
        /// Limit the token to one device or stream.
        #[arg(long, default_value = "")]
        device: String,
        /// What the token allows.
        #[arg(long, value_enum, default_value = "read")]
        access: TokenAccess,
        /// How long it is valid, e.g. 10m, 1h.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        ttl: std::time::Duration,
    },
    /// Replace the token signing key: every token issued so far stops working.
    RotateTokenKey,
    /// Upgrade conlogd in place (re-exec its binary; same as SIGUSR1).
    Upgrade,
    /// Close every stream of a guest, or one of them, and forget it. Its logs stay on disk
    /// (and `history` still reads them) unless --delete-logs.
    Remove {
        /// Guest name.
        guest: String,
        /// Only this device (console) of the guest; the others keep working. Removing the
        /// last one removes the guest.
        #[arg(long, conflicts_with = "stream")]
        device: Option<String>,
        /// Only this log stream of the guest (same as --device: streams and devices share
        /// one namespace).
        #[arg(long)]
        stream: Option<String>,
        /// Also delete the removed streams' log files (current, rotated and their indexes).
        #[arg(long)]
        delete_logs: bool,
    },
    /// Print a shell completion script, e.g. `conlogctl completions bash >
    /// /usr/share/bash-completion/completions/conlogctl`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write conlogctl's man pages (conlogctl.1 and one per command) into a directory.
    Man {
        /// Directory to write into, e.g. /usr/local/share/man/man1.
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Wiring {
    Path,
    Qemu,
    QemuLegacy,
    Libvirt,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TokenAccess {
    Read,
    ReadWrite,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check_flags(&args) {
        e.exit();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("conlogctl: {}", error_text(&e));
            match e.downcast_ref::<Failure>() {
                Some(failure) => ExitCode::from(failure.exit as u8),
                None => ExitCode::from(1),
            }
        }
    }
}

/// How a guest's serial port connects to the console socket `path` (docs/consoles.md): QEMU
/// is the client and reconnects every second; `serialN` is port N.
fn wiring(print: Wiring, device: &str, path: &str, mux: bool) -> String {
    // QEMU ids start with a letter; device names may start with a digit.
    let id = format!("conlog-{device}");
    let mux = if mux { ",mux=on" } else { "" };
    let port: u32 = device
        .strip_prefix("serial")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    match print {
        Wiring::Path => path.to_owned(),
        Wiring::Qemu => {
            format!(
                "-chardev socket,id={id},path={path}{mux},reconnect-ms=1000 -serial chardev:{id}"
            )
        }
        Wiring::QemuLegacy => {
            format!("-chardev socket,id={id},path={path}{mux},reconnect=1 -serial chardev:{id}")
        }
        Wiring::Libvirt => {
            let path = path
                .replace('&', "&amp;")
                .replace('\'', "&apos;")
                .replace('<', "&lt;")
                .replace('>', "&gt;");
            format!(
                "<serial type='unix'>\n  <source mode='connect' path='{path}'>\n    \
                 <reconnect enabled='yes' timeout='1'/>\n  </source>\n  \
                 <target port='{port}'/>\n</serial>"
            )
        }
    }
}

/// Refuses connection flags where they do not apply (a usage error, status 2), instead of
/// silently ignoring them: only `console` and `history` can use the TCP Console service.
fn check_flags(args: &Args) -> Result<(), clap::Error> {
    let remote = matches!(args.command, Cmd::Console { .. } | Cmd::History { .. });
    let offline = matches!(args.command, Cmd::Completions { .. } | Cmd::Man { .. });
    let given: Vec<&str> = [
        ("--server", args.server.is_some()),
        ("--token", args.token.is_some()),
        ("--ca", args.ca.is_some()),
        ("--cert", args.cert.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, set)| set.then_some(flag))
    .collect();
    let mut command = Args::command();
    if !remote && !given.is_empty() {
        return Err(command.error(
            clap::error::ErrorKind::ArgumentConflict,
            format!(
                "{} only applies to `console` and `history`; this command talks to conlogd's \
                 local socket (see --socket)",
                given.join(", ")
            ),
        ));
    }
    if remote && args.server.is_some() && args.socket.is_some() {
        return Err(command.error(
            clap::error::ErrorKind::ArgumentConflict,
            "--socket and --server both name where conlogd is: pass one",
        ));
    }
    if offline && args.socket.is_some() {
        return Err(command.error(
            clap::error::ErrorKind::ArgumentConflict,
            "--socket does not apply: this command does not talk to conlogd",
        ));
    }
    Ok(())
}

/// Writes conlogctl.1 and conlogctl-<command>.1 for every command into `dir`.
fn write_man_pages(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let command = Args::command();
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    Ok(())
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    conlog::config::HumanDuration::parse(text).map(|d| d.get())
}

async fn local_channel(socket: Option<PathBuf>) -> Result<Channel> {
    let socket = socket.unwrap_or_else(conlog::client::default_socket);
    conlog::client::connect_local(&socket)
        .await
        .with_context(|| {
            format!(
                "cannot connect to conlogd at {} (is conlogd running? pass --socket)",
                socket.display()
            )
        })
}

/// The channel for Console calls: TCP to `server` (--server, or the node a guest moved to),
/// else the local socket.
async fn console_channel(args: &Args, server: Option<&str>) -> Result<Channel> {
    let Some(url) = server else {
        return local_channel(args.socket.clone()).await;
    };
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("invalid --server URL {url}"))?;
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(client_tls(args)?)
            .context("cannot set up TLS")?;
    } else if args.ca.is_some() || args.cert.is_some() {
        bail!("--ca and --cert need an https:// --server");
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// TLS settings from --ca, --cert and --key.
fn client_tls(args: &Args) -> Result<tonic::transport::ClientTlsConfig> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let Some(ca) = &args.ca else {
        bail!("an https:// --server needs --ca FILE (the CA that signed its certificate)");
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

async fn run(args: Args) -> Result<ExitCode> {
    match &args.command {
        Cmd::Console {
            guest,
            device,
            read_only,
            force,
            replay,
            drain,
        } => {
            let options = terminal::Options {
                guest: guest.clone(),
                device: device.clone(),
                read_only: *read_only,
                force: *force,
                replay: *replay,
                drain: *drain,
            };
            let connect: terminal::Connect<'_> = Box::new(|server: Option<String>| {
                let args = &args;
                Box::pin(async move { console_channel(args, server.as_deref()).await })
            });
            let route = conlog::client::Route::new(args.server.clone());
            terminal::run(connect, route, args.token.clone(), options).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::History {
            guest,
            stream,
            tail_bytes,
            tail_lines,
            from,
            since,
            until,
            timestamps,
            events,
            follow,
            limit,
        } => {
            use conlog::proto::read_history_request::Start;
            let now = times::now_nanos();
            let when = |flag: &str, text: &Option<String>| {
                text.as_deref()
                    .map(|text| times::parse_when(text, now))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
            };
            let (since, until) = (when("since", since)?, when("until", until)?);
            if let (Some(since), Some(until)) = (since, until) {
                if until < since {
                    bail!("--until is before --since");
                }
            }
            let start = match (tail_bytes, tail_lines, from, since) {
                (Some(n), _, _, _) => Some(Start::TailBytes(*n)),
                (_, Some(n), _, _) => Some(Start::TailLines(*n)),
                (_, _, Some(offset), _) => Some(Start::FromOffset(*offset)),
                (_, _, _, Some(since)) => Some(Start::SinceTime(times::timestamp(since))),
                _ => None,
            };
            let request = proto::ReadHistoryRequest {
                guest: guest.clone(),
                stream: stream.clone(),
                start,
                follow: *follow,
                limit_bytes: limit.unwrap_or(0),
                text: false,
                until_time: until.map(times::timestamp),
                lines: *timestamps,
                events: events.is_some(),
                // The entry covering each line says whether its time is approximate.
                marks: *timestamps,
                times: false,
            };
            let output = HistoryOutput {
                timestamps: *timestamps,
                events: *events,
            };
            print_history(&args, request, output).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Completions { shell } => {
            let mut command = Args::command();
            clap_complete::generate(*shell, &mut command, "conlogctl", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Man { dir } => {
            write_man_pages(dir)?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let mut agent = AgentClient::new(local_channel(args.socket).await?);
    match args.command {
        Cmd::Run {
            guest,
            stream,
            max_size,
            max_backups,
            truncate,
            command,
        } => {
            let limits = (max_size.is_some() || max_backups.is_some() || truncate).then(|| {
                proto::LogLimits {
                    max_size,
                    max_backups,
                    mode: if truncate {
                        proto::LogMode::Truncate.into()
                    } else {
                        0
                    },
                    compress: None,
                    max_age_seconds: None,
                }
            });
            let reply = agent
                .create_log_pipe(proto::CreateLogPipeRequest {
                    guest,
                    stream,
                    limits,
                    migrate_from: None,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            // The command may run for days: close the connection to the daemon now.
            drop(agent);
            let fd_socket = PathBuf::from(&reply.fd_socket);
            let token = reply.handoff_token.clone();
            let pipe = tokio::task::spawn_blocking(move || {
                conlog::client::receive_pipe(&fd_socket, &token)
            })
            .await?
            .context("cannot receive the log pipe")?;
            run_attached(pipe, &command)
        }
        Cmd::Token {
            guest,
            device,
            access,
            ttl,
        } => {
            let access = match access {
                TokenAccess::Read => proto::Access::Read,
                TokenAccess::ReadWrite => proto::Access::ReadWrite,
            };
            let reply = agent
                .issue_token(proto::IssueTokenRequest {
                    guest,
                    device,
                    access: access.into(),
                    ttl_seconds: ttl.as_secs().max(1),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", reply.token);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::RotateTokenKey => {
            let reply = agent
                .rotate_token_key(proto::RotateTokenKeyRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            eprintln!(
                "new token key {}: every token issued before is revoked",
                reply.key_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Guests { guest, output } => {
            let reply = agent
                .list_guests(proto::ListGuestsRequest {
                    guest: guest.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match output {
                Output::Table => print_guests(&reply),
                Output::Json => println!("{}", guests_json(&reply)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CreateConsole {
            guest,
            device,
            print,
            mux,
        } => {
            if mux && matches!(print, Wiring::Libvirt) {
                bail!(
                    "--mux with --print libvirt: libvirt's <serial> has no mux option, so no \
                     console was created; use --print qemu, or a raw console and `virsh \
                     qemu-monitor-command --hmp DOMAIN 'chardev-send-break charserial0'` for a \
                     break (docs/consoles.md, \"Serial BREAK\")"
                );
            }
            let reply = agent
                .create_console(proto::CreateConsoleRequest {
                    guest,
                    device: device.clone(),
                    limits: None,
                    protocol: if mux {
                        proto::ConsoleProtocol::Mux as i32
                    } else {
                        proto::ConsoleProtocol::Unspecified as i32
                    },
                    migrate_from: None,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let device = if device.is_empty() {
                names::DEFAULT_CONSOLE_DEVICE
            } else {
                device.as_str()
            };
            let mux = reply.protocol == proto::ConsoleProtocol::Mux as i32;
            if mux && matches!(print, Wiring::Libvirt) {
                bail!(
                    "console {device} is a mux console, and libvirt's <serial> has no mux \
                     option: use --print qemu, or a raw console and `virsh qemu-monitor-command \
                     --hmp DOMAIN 'chardev-send-break charserial0'` for a break \
                     (docs/consoles.md, \"Serial BREAK\")"
                );
            }
            println!("{}", wiring(print, device, &reply.guest_socket, mux));
            eprintln!(
                "client socket: {}\nlog: {}",
                reply.client_socket, reply.log_path
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Upgrade => {
            let reply = agent
                .upgrade(proto::UpgradeRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!("conlogd (pid {}) is upgrading in place", reply.pid);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Console { .. } | Cmd::History { .. } | Cmd::Completions { .. } | Cmd::Man { .. } => {
            unreachable!("handled above")
        }
        Cmd::Remove {
            guest,
            device,
            stream,
            delete_logs,
        } => {
            let stream = device.or(stream).unwrap_or_default();
            let reply = agent
                .remove_guest(proto::RemoveGuestRequest {
                    guest: guest.clone(),
                    stream: stream.clone(),
                    delete_logs,
                    moved_to: String::new(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let what = if stream.is_empty() {
                format!("{guest} ({} streams)", reply.streams_removed)
            } else {
                format!("{guest}/{stream}")
            };
            if delete_logs {
                println!("removed {what}; {} log files deleted", reply.logs_deleted);
            } else {
                println!(
                    "removed {what}; its logs stay on disk (conlogctl history still reads them)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Adds `authorization: Bearer <token>` to a request when a token was given.
pub fn with_token<T>(message: T, token: &Option<String>) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .context("the token is not valid header text")?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// Where `history --events` prints events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum EventsTo {
    /// On stderr, so that stdout keeps exactly the guest's bytes.
    Stderr,
    /// In the output, each on a line of its own.
    Inline,
}

/// How `history` decorates what it prints.
#[derive(Clone, Copy, Debug)]
struct HistoryOutput {
    timestamps: bool,
    events: Option<EventsTo>,
}

/// An event frame as one line: `[conlog: 2026-12-05T03:12:07.123456789Z guest disconnected
/// (guest socket closed)]`.
fn event_line(event: &proto::HistoryEvent) -> String {
    let kind = proto::history_event::Kind::try_from(event.kind).map_or_else(
        |_| format!("event {}", event.kind),
        |k| k.as_str_name().to_lowercase().replace('_', " "),
    );
    let time = event.time.as_ref().map_or_else(
        || "-".to_owned(),
        |t| times::format_time(times::nanos_of(t)),
    );
    if event.detail.is_empty() {
        format!("[conlog: {time} {kind}]")
    } else {
        format!("[conlog: {time} {kind} ({})]", event.detail)
    }
}

/// The `--timestamps` prefix of a line starting at `offset` in `chunk`: the time of the index
/// entry covering it (the chunk's marks start with the one covering its first byte).
fn line_prefix(chunk: &proto::HistoryChunk, offset: u64) -> String {
    let covering = chunk.marks.iter().take_while(|m| m.offset <= offset).last();
    let (nanos, approximate) = match (covering, &chunk.time) {
        (Some(mark), _) => (mark.unix_nanos, mark.approximate),
        (None, Some(time)) => (times::nanos_of(time), false),
        (None, None) => return "- ".to_owned(),
    };
    let tilde = if approximate { "~" } else { "" };
    format!("{tilde}{} ", times::format_time(nanos))
}

/// Streams history to stdout; gaps are reported on stderr. On a terminal, sequences that make
/// it answer are removed (see `conlog::terminal_safety`); to a pipe or file the bytes are exact
/// (unless `--timestamps` or `--events=inline` add to them). A lost connection (upgrade,
/// takeover, restart) is resumed at the next offset not yet printed after a one-line notice,
/// with the same backoff as `console`.
async fn print_history(
    args: &Args,
    mut request: proto::ReadHistoryRequest,
    output: HistoryOutput,
) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let mut stdout = std::io::stdout().lock();
    let mut filter = stdout
        .is_terminal()
        .then(conlog::terminal_safety::QueryFilter::new);
    let mut shown = Vec::new();
    // Whether the next byte printed starts a line (for --timestamps and inline events).
    let mut at_line_start = true;
    // The last event printed (offset, time): after a reconnect it may come again.
    let mut last_event: Option<(u64, i64)> = None;
    // A conlogd without the time index ignores the new fields: its chunks have no time. Said
    // once, at the first data chunk, when the request needed times.
    let mut checked_times = !(output.timestamps
        || request.until_time.is_some()
        || matches!(
            request.start,
            Some(proto::read_history_request::Start::SinceTime(_))
        ));
    let limit = request.limit_bytes;
    let mut printed = 0u64;
    let mut next: Option<u64> = None;
    let mut first = true;
    let mut lost_since: Option<tokio::time::Instant> = None;
    let mut backoff = std::time::Duration::from_millis(100);
    let mut route = conlog::client::Route::new(args.server.clone());
    // The last attempt ended with a move (its own notice; no "reconnected" one).
    let mut moved = false;
    loop {
        let server = route.server().map(str::to_owned);
        let attempt = async {
            let mut client = ConsoleClient::new(console_channel(args, server.as_deref()).await?);
            let chunks = client
                .read_history(with_token(request.clone(), &args.token)?)
                .await;
            Ok::<_, anyhow::Error>(chunks)
        }
        .await;
        let why = match attempt {
            Err(e) if first => return Err(e),
            Err(e) => format!("{e:#}"),
            Ok(Err(status)) if conlog::client::moved_of(&status).is_some() => {
                follow_move(&mut route, &status, &mut request, next)?;
                moved = true;
                continue;
            }
            Ok(Err(status)) if first || !terminal::is_lost(&status) => return Err(refused(status)),
            Ok(Err(status)) => status_text(&status),
            Ok(Ok(chunks)) => {
                let mut chunks = chunks.into_inner();
                if !first && !std::mem::take(&mut moved) {
                    eprintln!(
                        "[conlog: reconnected; resuming at offset {}]",
                        next.unwrap_or(0)
                    );
                }
                first = false;
                lost_since = None;
                backoff = std::time::Duration::from_millis(100);
                loop {
                    let chunk = match chunks.message().await {
                        Ok(Some(chunk)) => chunk,
                        Ok(None) => return Ok(()),
                        Err(status) if conlog::client::moved_of(&status).is_some() => {
                            if limit > 0 && printed >= limit {
                                return Ok(());
                            }
                            if limit > 0 {
                                request.limit_bytes = limit - printed;
                            }
                            follow_move(&mut route, &status, &mut request, next)?;
                            moved = true;
                            break String::new();
                        }
                        Err(status) if terminal::is_lost(&status) => break status_text(&status),
                        Err(status) => return Err(refused(status)),
                    };
                    if let Some(gap) = &chunk.gap {
                        if gap.reason.is_empty() {
                            eprintln!(
                                "[conlog: offsets {}..{} are no longer on disk]",
                                gap.from_offset, gap.to_offset
                            );
                        } else {
                            eprintln!(
                                "[conlog: offsets {}..{} cannot be read: {}]",
                                gap.from_offset, gap.to_offset, gap.reason
                            );
                        }
                    }
                    if let Some(event) = &chunk.event {
                        let key = (event.offset, event.time.as_ref().map_or(0, times::nanos_of));
                        if last_event.is_some_and(|last| key <= last) {
                            continue;
                        }
                        last_event = Some(key);
                        let line = event_line(event);
                        let written = match output.events {
                            Some(EventsTo::Inline) => {
                                let newline = if at_line_start { "" } else { "\n" };
                                at_line_start = true;
                                writeln!(stdout, "{newline}{line}").and_then(|()| stdout.flush())
                            }
                            _ => {
                                eprintln!("{line}");
                                Ok(())
                            }
                        };
                        if written.is_err() {
                            return Ok(());
                        }
                        continue;
                    }
                    if !checked_times && !chunk.data.is_empty() {
                        checked_times = true;
                        if chunk.time.is_none() {
                            eprintln!(
                                "[conlog: no times in conlogd's reply: it predates the time index, \
                                 or these bytes were logged without one; --since/--until may \
                                 not have applied]"
                            );
                        }
                    }
                    // After a reconnect the stream resumes exactly at `next`; never show twice.
                    let skip = next.map_or(0, |n| n.saturating_sub(chunk.offset));
                    let skip = usize::try_from(skip).unwrap_or(usize::MAX);
                    let data = chunk.data.get(skip..).unwrap_or_default();
                    next = next.max(Some(chunk.offset + chunk.data.len() as u64));
                    printed += data.len() as u64;
                    // With --timestamps, each line start gets the time of the entry covering
                    // it (conlogd sends one line per chunk; an older one may send several).
                    let mut at = chunk.offset + skip as u64;
                    let mut rest = data;
                    let mut written = Ok(());
                    while !rest.is_empty() && written.is_ok() {
                        let end = rest
                            .iter()
                            .position(|b| *b == b'\n')
                            .map_or(rest.len(), |i| i + 1);
                        let (line, after) = rest.split_at(end);
                        let ends_line = line.last() == Some(&b'\n');
                        if output.timestamps && at_line_start {
                            written = stdout.write_all(line_prefix(&chunk, at).as_bytes());
                        }
                        let line = match &mut filter {
                            Some(filter) => {
                                shown.clear();
                                filter.push(line, &mut shown);
                                &shown[..]
                            }
                            None => line,
                        };
                        written = written.and_then(|()| stdout.write_all(line));
                        at_line_start = ends_line;
                        at += end as u64;
                        rest = after;
                    }
                    if written.and_then(|()| stdout.flush()).is_err() {
                        return Ok(()); // stdout closed (e.g. `| head`)
                    }
                }
            }
        };
        if limit > 0 && printed >= limit {
            return Ok(());
        }
        if why.is_empty() {
            continue; // moved: reconnected to the new node at once
        }
        let since = *lost_since.get_or_insert_with(|| {
            eprintln!("[conlog: connection lost ({why}); reconnecting]");
            tokio::time::Instant::now()
        });
        if since.elapsed() >= terminal::RECONNECT_FOR {
            return Err(Failure::new(
                Exit::Lost,
                format!(
                    "connection to conlogd lost and not back after {:?}: {why}",
                    terminal::RECONNECT_FOR
                ),
            )
            .into());
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
        if let Some(next) = next {
            request.start = Some(proto::read_history_request::Start::FromOffset(next));
        }
        if limit > 0 {
            request.limit_bytes = limit - printed;
        }
    }
}

/// Follows the moved status `status` (docs/operations.md, "When a guest moves"): a one-line
/// notice, the route to the new node, and the request resumed at the next offset not yet
/// printed (unchanged if nothing was: offsets continue on the new node).
fn follow_move(
    route: &mut conlog::client::Route,
    status: &tonic::Status,
    request: &mut proto::ReadHistoryRequest,
    next: Option<u64>,
) -> Result<()> {
    let moved = conlog::client::moved_of(status).expect("a moved status");
    route
        .follow(&moved)
        .map_err(|e| Failure::new(Exit::Refused, e.to_string()))?;
    eprintln!("[conlog: guest moved to {}; following]", moved.to);
    if let Some(next) = next {
        request.start = Some(proto::read_history_request::Start::FromOffset(next));
    }
    Ok(())
}

/// A status as one line: its code and message, without repeating the message's own prefix.
pub fn status_text(status: &tonic::Status) -> String {
    let message = status.message().trim();
    if message.is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {message}", status.code())
    }
}

/// An error chain as one line, each cause shown once (tonic and hyper repeat their sources).
pub fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(cause.trim()) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(cause.trim());
    }
    text
}

pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(status_text(&status))
}

/// Runs `command` with stdout and stderr on `pipe`; returns its exit status (128+signal when
/// killed, as a shell reports it).
fn run_attached(pipe: OwnedFd, command: &[String]) -> Result<ExitCode> {
    let Some((program, args)) = command.split_first() else {
        bail!("no command given after --");
    };
    let stderr = pipe.try_clone().context("cannot duplicate the pipe")?;
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::inherit())
        .stdout(Stdio::from(pipe))
        .stderr(Stdio::from(stderr))
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// The ListGuests reply as JSON: field names as in the API (snake_case), kinds as words, every
/// field present (zero values included), so scripts need not know protobuf's defaults.
fn guests_json(reply: &proto::ListGuestsResponse) -> serde_json::Value {
    use serde_json::json;
    let guests: Vec<_> = reply
        .guests
        .iter()
        .map(|guest| {
            let streams: Vec<_> = guest
                .streams
                .iter()
                .map(|s| {
                    let mode = match proto::LogMode::try_from(s.mode) {
                        Ok(proto::LogMode::Truncate) => "truncate",
                        _ => "rotate",
                    };
                    json!({
                        "name": s.name,
                        "kind": kind_name(s),
                        "state": stream_state(s),
                        "offset": s.offset,
                        "first_offset": s.first_offset,
                        "open": s.open,
                        "log_path": s.log_path,
                        "bytes_on_disk": s.bytes_on_disk,
                        "raw_bytes": s.raw_bytes,
                        "backups": s.backups,
                        "compression_backlog_bytes": s.compression_backlog_bytes,
                        "max_size": s.max_size,
                        "max_backups": s.max_backups,
                        "mode": mode,
                        "writers": s.writers,
                        "clients": s.clients,
                        "guest_connected": s.guest_connected,
                        "dropped_bytes": s.dropped_bytes,
                        "rotations": s.rotations,
                        "broken": s.broken,
                        "writer": s.writer,
                        "attached": s.attached,
                    })
                })
                .collect();
            json!({ "name": guest.name, "streams": streams })
        })
        .collect();
    json!({ "guests": guests })
}

/// A stream's kind in one word.
fn kind_name(s: &proto::StreamInfo) -> &'static str {
    match proto::StreamKind::try_from(s.kind) {
        Ok(proto::StreamKind::Console) => "console",
        _ => "pipe",
    }
}

/// A stream's state in one word, as the table shows it.
fn stream_state(s: &proto::StreamInfo) -> &'static str {
    let console = kind_name(s) == "console";
    match () {
        _ if s.broken => "broken",
        _ if console && s.guest_connected => "guest-up",
        _ if console => "waiting",
        _ if s.open => "open",
        _ => "closed",
    }
}

fn print_guests(reply: &proto::ListGuestsResponse) {
    println!(
        "{:<24} {:<10} {:<8} {:<8} {:>7} {:>14} {:>12} {:>10}  LOG",
        "GUEST", "STREAM", "KIND", "STATE", "CLIENTS", "OFFSET", "ON-DISK", "MAX-SIZE"
    );
    for guest in &reply.guests {
        for s in &guest.streams {
            let kind = kind_name(s);
            let state = stream_state(s);
            println!(
                "{:<24} {:<10} {:<8} {:<8} {:>7} {:>14} {:>12} {:>10}  {}",
                guest.name,
                s.name,
                kind,
                state,
                s.clients,
                s.offset,
                s.bytes_on_disk,
                s.max_size,
                s.log_path
            );
            // Consoles: who is attached, the writer lease's holder first (once, even if a
            // watcher has the same label).
            let mut writer_shown = s.writer.is_empty();
            if !writer_shown {
                println!("    writer:  {}", s.writer);
            }
            for client in &s.attached {
                if !writer_shown && *client == s.writer {
                    writer_shown = true;
                    continue;
                }
                println!("    watcher: {client}");
            }
        }
    }
}
