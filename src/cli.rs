//! The command line: one subcommand per role. Every flag is also an environment variable, and every
//! value is parsed and validated here, once, so a bad configuration fails at start naming the flag.
use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{agent, controller, status, webhook};

#[derive(Debug, Parser)]
#[command(name = "spot-rebalancer", version, about, propagate_version = true)]
pub struct Cli {
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // Parsed once at start-up; boxing would only add noise.
pub enum Role {
    /// Watch this node's instance metadata for rebalance and interruption notices.
    Agent(agent::Args),
    /// Replace noticed nodes: scale first, wait for Ready, fall back to on-demand, then taint.
    Controller(controller::Args),
    /// Admission webhook: keep taint-driven eviction PDB-safe and the taint after the replacement.
    Webhook(webhook::Args),
    /// Show the opted-in nodes' replacement state: phase, replacement, taint, age, reason.
    Status(status::Args),
}

/// Where a role serves `/healthz`, `/readyz` and `/metrics`.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// Address of the plain-HTTP admin server (health, readiness, Prometheus metrics).
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_bad_admin_address_names_the_flag() {
        let error = Cli::try_parse_from(["spot-rebalancer", "agent", "--admin-addr", "nowhere"])
            .expect_err("an address without a port must be refused");
        assert!(error.to_string().contains("--admin-addr"), "{error}");
    }

    #[test]
    fn status_until_takes_phases_and_needs_watch() {
        let cli = Cli::try_parse_from([
            "spot-rebalancer",
            "status",
            "--watch",
            "--until",
            "Tainted,Failed",
        ])
        .expect("phases by name");
        let Role::Status(args) = cli.role else {
            panic!("the status subcommand")
        };
        assert_eq!(
            args.until,
            [
                crate::controller::record::Phase::Tainted,
                crate::controller::record::Phase::Failed
            ]
        );
        let error = Cli::try_parse_from(["spot-rebalancer", "status", "--until", "Tainted"])
            .expect_err("--until without --watch");
        assert!(error.to_string().contains("--watch"), "{error}");
        let error = Cli::try_parse_from(["spot-rebalancer", "status", "-w", "--until", "Sleeping"])
            .expect_err("not a phase");
        assert!(error.to_string().contains("--until"), "{error}");
    }
}
