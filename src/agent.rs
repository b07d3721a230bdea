//! The node agent: watches this node's instance metadata (IMDS) for rebalance and interruption
//! notices and records them on its own Node.
use clap::Args as ClapArgs;
use tokio_util::sync::CancellationToken;

use crate::{admin, cli::AdminArgs};

#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Runs the agent until `shutdown` is cancelled.
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
