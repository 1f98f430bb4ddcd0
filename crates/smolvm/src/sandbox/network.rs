//! The sandbox's egress policy: what the guest may reach (see
//! `docs/network.md`). Kept in the VM's config in the state store, so it
//! holds across stop/start and restores; applied at once to a running VM
//! through its supervisor.

use super::lock::VmLock;
use super::record::config_of;
use super::Sandbox;
use crate::config::EgressPolicy;
use crate::error::{Error, ErrorKind, Result};
use crate::state::VmState;
use smolvm_proto::supervisor::{ControlErrorKind, ControlRequest, ControlResponse};

impl Sandbox {
    /// The VM's egress policy, as stored now.
    pub async fn egress(&self) -> Result<EgressPolicy> {
        let rec = self.record().await?;
        Ok(config_of(&rec)?.egress)
    }

    /// The policy a launch of this VM starts with: the stored one (another
    /// process may have changed it since this handle was opened).
    pub(super) async fn launch_egress(&self) -> EgressPolicy {
        match self.record().await.and_then(|r| config_of(&r)) {
            Ok(c) => c.egress,
            Err(_) => self.config.egress.clone(),
        }
    }

    /// Sets the egress policy: checked (invalid entries are an
    /// `invalid_input` error and change nothing), applied to the running
    /// VM at once (to allowlist or off: every open connection is cut), and
    /// stored for its later starts. A VM created without a network takes
    /// only `Off`. Returns the policy in its normal form.
    pub async fn set_egress(&self, policy: EgressPolicy) -> Result<EgressPolicy> {
        let policy = crate::egress::normalize(&policy)?;
        let _lock = VmLock::acquire(&self.id).await?;
        let rec = self.record().await?;
        let cfg = config_of(&rec)?;
        if !cfg.network && policy != EgressPolicy::Off {
            return Err(Error::InvalidState {
                id: self.id.clone(),
                state: rec.state,
                hint: "it was created without a network (`--no-network`, or `--egress off` at \
                       creation, which leaves the NIC out), so its egress policy can only be \
                       `off`: a NIC cannot be added later. To switch a VM between off and on, \
                       create it with the network on and use `smolvm network set ID --egress off`"
                    .into(),
            });
        }
        if matches!(rec.state, VmState::Running | VmState::Paused) {
            self.apply_egress(&policy).await?;
        }
        let stored = policy.clone();
        self.update_config("policy", move |cfg| {
            cfg.egress = stored;
            Ok(())
        })
        .await?;
        Ok(policy)
    }

    /// Sends the policy to the VM's supervisor. Its failures that are not
    /// of another kind (nft failed, the network helper died) are `network`.
    async fn apply_egress(&self, policy: &EgressPolicy) -> Result<()> {
        let c = self.open_connection().await?;
        match c.control(ControlRequest::SetEgress(policy.clone())).await {
            Ok(ControlResponse::Ok) => Ok(()),
            Ok(ControlResponse::Error(e)) if e.kind == ControlErrorKind::Other => {
                Err(Error::Control {
                    id: self.id.clone(),
                    kind: ErrorKind::Network,
                    message: e.message,
                })
            }
            Ok(ControlResponse::Error(e)) => Err(Error::from_control(&self.id, e)),
            Ok(o) => Err(Error::Control {
                id: self.id.clone(),
                kind: ErrorKind::Network,
                message: format!("unexpected answer {o:?}"),
            }),
            Err(source) => {
                self.forget_client();
                Err(Error::Client {
                    id: self.id.clone(),
                    source,
                })
            }
        }
    }
}
