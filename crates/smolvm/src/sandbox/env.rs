//! The sandbox's persistent environment: variables every later command
//! sees (under its own), kept in the VM's config in the state store, so
//! they hold across stop/start and for every process that opens the VM.

use super::record::{config_of, store};
use super::Sandbox;
use crate::config::{validate_env, SandboxConfig};
use crate::error::{Error, Result};
use std::collections::BTreeMap;

impl Sandbox {
    /// The VM's persistent environment, as stored now.
    pub async fn env(&self) -> Result<BTreeMap<String, String>> {
        let rec = self.record().await?;
        Ok(config_of(&rec)?.env)
    }

    /// Sets variables: merged into the current ones (`merge`), or replacing
    /// them all. Keys must match `^[A-Za-z_][A-Za-z0-9_]*$`; the whole stays
    /// within the VM-wide limits. Returns the new environment.
    pub async fn set_env(
        &self,
        vars: BTreeMap<String, String>,
        merge: bool,
    ) -> Result<BTreeMap<String, String>> {
        // Each given variable must be valid by itself, whatever it merges with.
        validate_env(&vars)?;
        self.update_env(move |env| {
            if !merge {
                env.clear();
            }
            env.extend(vars);
        })
        .await
    }

    /// Removes variables (absent ones are no error). Returns the new
    /// environment.
    pub async fn unset_env(&self, keys: Vec<String>) -> Result<BTreeMap<String, String>> {
        self.update_env(move |env| {
            for k in &keys {
                env.remove(k);
            }
        })
        .await
    }

    async fn update_env(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, String>) + Send + 'static,
    ) -> Result<BTreeMap<String, String>> {
        self.update_config("environment", move |cfg| {
            change(&mut cfg.env);
            validate_env(&cfg.env)?;
            Ok(cfg.env.clone())
        })
        .await
    }

    /// Changes the VM's stored config in one write transaction (other
    /// processes' changes in between are never lost); `change` may refuse,
    /// and then nothing is written. `what` names it in errors.
    pub(super) async fn update_config<T: Send + 'static>(
        &self,
        what: &'static str,
        change: impl FnOnce(&mut SandboxConfig) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (id, created_at) = (self.id.clone(), self.created_at);
        tokio::task::spawn_blocking(move || {
            let mut result = None;
            let found = store()?.update_config(&id, created_at, |json| {
                let mut cfg: SandboxConfig = serde_json::from_str(json).map_err(|e| {
                    Error::Store(crate::state::StoreError::Corrupt {
                        id: id.clone(),
                        reason: e.to_string(),
                    })
                })?;
                result = Some(change(&mut cfg)?);
                serde_json::to_string(&cfg).map_err(|e| Error::Invalid(e.to_string()))
            })?;
            match (found, result) {
                (true, Some(r)) => Ok(r),
                _ => Err(Error::NotFound(id)),
            }
        })
        .await
        .map_err(|e| Error::Invalid(format!("the {what} update failed: {e}")))?
    }
}
