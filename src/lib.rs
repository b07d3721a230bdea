//! spot-rebalancer replaces at-risk EC2 spot nodes before it taints them: scale the node group first,
//! wait for the replacement to be Ready, fall back to on-demand when spot capacity is gone, then taint.
//!
//! One binary, three roles (see `cli::Role`): the node `agent`, the replacement `controller` and the
//! admission `webhook`; and `status`, the operator's view of the opted-in nodes. Each role serves
//! `/healthz`, `/readyz` and `/metrics` (see [`admin`]) and stops cleanly on SIGTERM (see
//! [`shutdown`]).

pub mod admin;
pub mod agent;
pub mod aws;
pub mod backoff;
pub mod ca_store;
pub mod cli;
pub mod code_pages;
pub mod contract;
pub mod controller;
pub mod fence;
pub mod imds;
/// The keys, at their old path: `crate::keys` is `crate::contract::keys`.
pub use contract::keys;
pub mod kube_config;
pub mod lease;
pub mod node;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod webhook;

/// Why a role stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("admin server: {0}")]
    Admin(#[from] admin::Error),
    #[error("agent: {0}")]
    Agent(#[from] agent::Error),
    #[error("controller: {0}")]
    Controller(#[from] controller::Error),
    #[error("webhook: {0}")]
    Webhook(#[from] webhook::Error),
    #[error("status: {0}")]
    Status(#[from] status::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs one role until SIGTERM or SIGINT, then shuts it down gracefully.
pub async fn run(role: cli::Role) -> Result<()> {
    let shutdown = shutdown::on_signal();
    match role {
        cli::Role::Agent(args) => agent::run(args, shutdown).await,
        cli::Role::Controller(args) => controller::run(args, shutdown).await,
        cli::Role::Webhook(args) => webhook::run(args, shutdown).await,
        cli::Role::Status(args) => status::run(args, shutdown).await,
    }
}
