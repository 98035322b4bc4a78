//! `conlog-gateway`: one Console endpoint for a fleet of conlogd nodes (docs/gateway.md).

use anyhow::Context;
use clap::{Parser, Subcommand};
use conlog::gateway::config::GatewayConfig;
use std::path::PathBuf;

#[derive(Parser)]
#[command(version, about = "One conlog Console endpoint for a fleet of nodes")]
struct Args {
    /// The gateway's config file (a `gateway:` section; docs/operations.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Prints the effective configuration (every key, defaults filled in) and exits.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the token key of node NODE (its `node.advertise`) derived from the cluster key,
    /// for the node's `<data_dir>/state/token.key` (then SIGHUP the node).
    NodeKey {
        /// The cluster key file (64 hex digits).
        #[arg(long)]
        cluster_key: PathBuf,
        /// The node's Console endpoint, `host:port`, exactly as its `node.advertise` says.
        #[arg(long)]
        node: String,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::NodeKey { cluster_key, node }) = args.command {
        let key = conlog::tokens::ClusterKey::load(&cluster_key)
            .with_context(|| format!("cluster key {}", cluster_key.display()))?;
        print!("{}", key.node_key_file(&node)?);
        return Ok(());
    }
    let path = args
        .config
        .context("--config FILE is required (the gateway has no defaults for its certificates)")?;
    let config = GatewayConfig::load(&path)?;
    if args.print_config {
        print!("{}", config.to_yaml());
        return Ok(());
    }
    config.log_format.init_tracing(&config.log_level);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(conlog::gateway::run(config))?;
    Ok(())
}
