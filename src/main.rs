//! The `spot-rebalancer` binary: parse the command line, start logging, run the chosen role.
use std::{process::ExitCode, time::Duration};

use clap::Parser;
use spot_rebalancer::{
    cli::{Cli, Role},
    telemetry,
};

/// After a role has stopped, how long leftover tasks (a blocking DNS lookup, a slow connection) may
/// hold the exit. Dropping a Tokio runtime waits for blocking tasks without a limit.
const EXIT_GRACE: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    // The agent polls every few seconds and writes rarely: one thread is plenty, and each worker
    // thread costs resident memory on every node. The other roles serve and reconcile in parallel.
    let runtime = match cli.role {
        Role::Agent(_) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        _ => tokio::runtime::Runtime::new(),
    }
    .expect("start the Tokio runtime");
    let result = runtime.block_on(spot_rebalancer::run(cli.role));
    runtime.shutdown_timeout(EXIT_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "spot-rebalancer stopped with an error");
            ExitCode::FAILURE
        }
    }
}
