//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager), so two replicas can
//! run: one reconciles, the other stands by and takes over when the Lease is released (clean
//! shutdown) or expires (a crashed leader).

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Joins the election. The receiver says whether this replica leads; dropping every receiver
/// makes the task release the Lease and end.
pub async fn start(
    client: Client,
    lease_name: &str,
    namespace: &str,
    identity: &str,
    duration_seconds: u64,
) -> anyhow::Result<(watch::Receiver<bool>, JoinHandle<Result<LeaseManager, LeaseManagerError>>)> {
    let duration = duration_seconds.max(3);
    // Renew a third of the way before expiry, so one slow request does not lose the Lease.
    let grace = (duration / 3).max(1);
    let manager = LeaseManagerBuilder::new(client, lease_name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(duration)
        .with_grace(grace)
        .with_field_manager(format!("mirrorfleet-leader-{identity}"))
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("joining the leader election on Lease {namespace}/{lease_name}: {e}"))?;
    Ok(manager.watch().await)
}
