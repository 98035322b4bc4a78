//! `conlogd`: loads the configuration and runs the daemon.

use clap::{CommandFactory, Parser};
use conlog::config::{Config, Overrides};
use conlog::daemon::Start;
use std::net::SocketAddr;
use std::path::PathBuf;

const SIGNALS_HELP: &str = "\
Signals:
  SIGUSR1  upgrade in place: re-execute the binary at its path, carrying every pipe, console and
           connection (nothing logged or pending is lost; refused up front if the new binary
           cannot start)
  SIGHUP   reload the TLS certificate, key and client CA (the rest of the configuration is read
           at start and at an upgrade)
  SIGTERM  stop: drain every pipe into its log, remove the sockets, exit 0
  SIGINT   as SIGTERM

Environment:
  RUST_LOG  log filter, overrides `log_level` (e.g. RUST_LOG=conlog=debug)
  NO_COLOR  never colour the log (it is coloured only when stderr is a terminal anyway)

Files: docs/operations.md in the source, or `man conlogd` where the packaging installs it.";

/// Keeps every byte a VM prints in size-capped logs and serves its consoles.
#[derive(Parser)]
#[command(name = "conlogd", version, about, after_help = SIGNALS_HELP)]
struct Args {
    /// YAML configuration file (embedded defaults when absent).
    #[arg(long)]
    config: Option<PathBuf>,
    /// TCP address of the Console service (default 127.0.0.1:7770).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory of conlogd.sock, fd.sock and console sockets.
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Directory of persistent state (and of logs/ unless --log-dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory of log files.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Address of the Prometheus /metrics endpoint (default 127.0.0.1:7771).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Take over from the daemon running on the same runtime dir through handover.sock
    /// (start fresh if there is none).
    #[arg(long)]
    takeover: bool,
    /// After handing over to a successor, stay idle until SIGTERM instead of exiting (for
    /// supervisors that restart an exited process, such as Kubernetes).
    #[arg(long)]
    linger_after_handover: bool,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
    /// Print the upgrade snapshot format this binary reads and exit (used before an upgrade).
    #[arg(long, hide = true)]
    snapshot_format: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Hold conlogd's descriptors (pipes, consoles, listeners) through its crashes and hand them
    /// back; listens on keeper.sock in the runtime dir (docs/operations.md, "Crash guarantees").
    Keeper {
        /// YAML configuration file (for runtime_dir).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Directory of keeper.sock (conlogd's runtime dir).
        #[arg(long)]
        runtime_dir: Option<PathBuf>,
        /// If another keeper serves the directory, wait for it to end and then serve, instead
        /// of exiting (a keeper container beside another pod's during a rolling update).
        #[arg(long)]
        standby: bool,
        /// Only check that a keeper answers (exit 0) or not (exit 1), for a probe.
        #[arg(long)]
        check: bool,
    },
    /// Print a shell completion script (for the packaging).
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write conlogd's man pages (conlogd.1, conlogd-keeper.1) into a directory (for the
    /// packaging).
    #[command(hide = true)]
    Man {
        /// Directory to write into, e.g. /usr/local/share/man/man1.
        dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    // First of all, before any thread exists (threads inherit the mask): the signals the daemon
    // handles wait, pending, until its handlers are in place once it serves, so SIGUSR1 or
    // SIGHUP during a long start-up is acted on then instead of killing it (default action).
    conlog::upgrade::exec::block_signals();
    // Then, before anything opens a descriptor: an upgraded image adopts what it carries and
    // closes everything else it inherited.
    let inherited = conlog::upgrade::exec::inherited();
    // Also before any thread exists: what systemd's descriptor store hands back.
    conlog::keeper::systemd::take_listen_fds();
    let args = Args::parse();
    match args.command {
        Some(Command::Keeper {
            config,
            runtime_dir,
            standby,
            check,
        }) => return keeper(config, runtime_dir, standby, check),
        Some(Command::Completions { shell }) => {
            let mut command = Args::command();
            clap_complete::generate(shell, &mut command, "conlogd", &mut std::io::stdout());
            return Ok(());
        }
        Some(Command::Man { dir }) => {
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(Args::command(), &dir)?;
            return Ok(());
        }
        None => {}
    }

    let overrides = Overrides {
        listen: args.listen,
        metrics: args.metrics,
        runtime_dir: args.runtime_dir,
        data_dir: args.data_dir,
        log_dir: args.log_dir,
    };
    let config = match Config::load(args.config.as_deref(), overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("conlogd: {e}");
            std::process::exit(2);
        }
    };
    // The upgrade preflight: this binary starts, accepts the same flags and config, and reads
    // this snapshot format.
    if args.snapshot_format {
        conlog::daemon::preflight(&config)?;
        println!("{}", conlog::upgrade::snapshot::FORMAT_VERSION);
        return Ok(());
    }
    if args.print_config {
        print!("{}", config.to_yaml());
        return Ok(());
    }
    config.log_format.init_tracing(&config.log_level);
    let start = match inherited {
        Ok(Some(state)) => Start::Upgraded(state),
        Ok(None) if args.takeover => Start::Takeover,
        Ok(None) => Start::Fresh,
        Err(why) => {
            tracing::error!(error = %why, "the upgrade snapshot is unusable; starting from the state directory");
            Start::Fresh
        }
    };
    let image = conlog::upgrade::exec::Image::current();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Err(e) = runtime.block_on(conlog::daemon::run(
        config,
        start,
        image,
        conlog::daemon::RunOptions {
            linger_after_handover: args.linger_after_handover,
        },
    )) {
        eprintln!("conlogd: {e}");
        std::process::exit(1);
    }
    Ok(())
}

/// `conlogd keeper`: runs until told to quit or its socket goes away.
fn keeper(
    config: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
    standby: bool,
    check: bool,
) -> anyhow::Result<()> {
    let overrides = Overrides {
        runtime_dir,
        ..Overrides::default()
    };
    let config = match Config::load(config.as_deref(), overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("conlogd keeper: {e}");
            std::process::exit(2);
        }
    };
    if check {
        if let Err(e) = conlog::keeper::check(config.runtime_dir()) {
            eprintln!("conlogd keeper: no keeper answers: {e}");
            std::process::exit(1);
        }
        return Ok(());
    }
    config.log_format.init_tracing(&config.log_level);
    conlog::keeper::server::run(config.runtime_dir(), standby)?;
    Ok(())
}
