//! `conlogctl`: the command line of conlogd.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use conlog::proto::{self, agent_client::AgentClient};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

/// Command line of conlogd: log pipes, guests, consoles and history.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// conlogd's local socket (default: <runtime_dir>/conlogd.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
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
        /// Stream name (default "qemu").
        #[arg(long, default_value = "")]
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
    },
    /// Close every stream of a guest and forget it (its logs stay).
    Remove {
        /// Guest name.
        guest: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("conlogctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    let socket = args.socket.unwrap_or_else(conlog::client::default_socket);
    let channel = conlog::client::connect_local(&socket)
        .await
        .with_context(|| format!("cannot connect to conlogd at {}", socket.display()))?;
    let mut agent = AgentClient::new(channel);
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
                }
            });
            let reply = agent
                .create_log_pipe(proto::CreateLogPipeRequest {
                    guest,
                    stream,
                    limits,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let fd_socket = PathBuf::from(&reply.fd_socket);
            let token = reply.handoff_token.clone();
            let pipe = tokio::task::spawn_blocking(move || {
                conlog::client::receive_pipe(&fd_socket, &token)
            })
            .await?
            .context("cannot receive the log pipe")?;
            run_attached(pipe, &command)
        }
        Cmd::Guests { guest } => {
            let reply = agent
                .list_guests(proto::ListGuestsRequest {
                    guest: guest.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_guests(&reply);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Remove { guest } => {
            let reply = agent
                .remove_guest(proto::RemoveGuestRequest {
                    guest: guest.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "removed {guest} ({} streams); its logs stay on disk",
                reply.streams_removed
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
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

fn print_guests(reply: &proto::ListGuestsResponse) {
    println!(
        "{:<24} {:<10} {:<8} {:<7} {:>14} {:>12} {:>10}  LOG",
        "GUEST", "STREAM", "KIND", "STATE", "OFFSET", "ON-DISK", "MAX-SIZE"
    );
    for guest in &reply.guests {
        for s in &guest.streams {
            let kind = match proto::StreamKind::try_from(s.kind) {
                Ok(proto::StreamKind::Console) => "console",
                _ => "pipe",
            };
            let state = if s.broken {
                "broken"
            } else if s.open {
                "open"
            } else {
                "closed"
            };
            println!(
                "{:<24} {:<10} {:<8} {:<7} {:>14} {:>12} {:>10}  {}",
                guest.name, s.name, kind, state, s.offset, s.bytes_on_disk, s.max_size, s.log_path
            );
        }
    }
}
