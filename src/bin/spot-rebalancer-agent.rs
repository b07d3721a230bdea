//! `spot-rebalancer-agent`: the node agent alone, for the DaemonSet. It takes exactly the command
//! line of `spot-rebalancer agent`, but links none of the controller's or the webhook's code (no AWS
//! Auto Scaling client, no admission server), so the code pages every node keeps resident are the
//! agent's only. It runs on one thread: a poll every few seconds and a rare write need no more.
use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use spot_rebalancer::{agent, cli::LogFormat, shutdown, telemetry};

/// See `main.rs`: how long leftover tasks may hold the exit after the agent stopped.
const EXIT_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(
    name = "spot-rebalancer-agent",
    version,
    about = "The spot-rebalancer node agent"
)]
struct AgentCli {
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    role: AgentRole,
}

#[derive(Debug, Subcommand)]
enum AgentRole {
    /// Watch this node's instance metadata for rebalance and interruption notices.
    Agent(agent::Args),
}

fn main() -> ExitCode {
    let AgentCli { log_format, role } = AgentCli::parse();
    let AgentRole::Agent(args) = role;
    telemetry::init(log_format);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("start the Tokio runtime");
    let result = runtime.block_on(async move {
        // The signal handlers need the runtime: installed inside it.
        let shutdown = shutdown::on_signal();
        agent::run(args, shutdown).await
    });
    runtime.shutdown_timeout(EXIT_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "spot-rebalancer agent stopped with an error");
            ExitCode::FAILURE
        }
    }
}
