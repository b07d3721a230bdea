//! The `spot-rebalancer` binary: parse the command line, start logging, run the chosen role.
use std::process::ExitCode;

use clap::Parser;
use spot_rebalancer::{cli::Cli, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match spot_rebalancer::run(cli.role).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "spot-rebalancer stopped with an error");
            ExitCode::FAILURE
        }
    }
}
