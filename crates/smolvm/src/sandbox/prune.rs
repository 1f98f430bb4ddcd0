//! Finding and removing leftovers: VM directories and lock files without a
//! row in the store, and (on request) VMs in `error`.

use crate::error::{Error, Result};
use crate::state::{Store, VmState};
use serde::Serialize;
use std::collections::HashSet;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PruneItem {
    /// What it is: "orphan directory", "orphan lock", "error VM".
    pub kind: String,
    pub id: String,
    pub path: Option<PathBuf>,
}

/// Lists (and unless `dry_run`, removes) leftovers. `errors` also removes
/// VMs in state `error`.
pub async fn prune(dry_run: bool, errors: bool) -> Result<Vec<PruneItem>> {
    let store = Store::open()?;
    let recs = store.list()?;
    let known: HashSet<String> = recs.iter().map(|r| r.id.clone()).collect();
    let mut items = Vec::new();
    let scan = |dir: PathBuf, suffix: &str, kind: &str, items: &mut Vec<PruneItem>| {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(id) = name.strip_suffix(suffix) else {
                continue;
            };
            if !known.contains(id) {
                items.push(PruneItem {
                    kind: kind.into(),
                    id: id.to_string(),
                    path: Some(e.path()),
                });
            }
        }
    };
    let data = crate::paths::data_dir();
    scan(data.join("vms"), "", "orphan directory", &mut items);
    scan(data.join("locks"), ".lock", "orphan lock", &mut items);
    if errors {
        for r in recs.iter().filter(|r| r.state == VmState::Error) {
            items.push(PruneItem {
                kind: "error VM".into(),
                id: r.id.clone(),
                path: Some(crate::paths::vm_dir(&r.id)),
            });
        }
        // A `create` killed between inserting the row and making the disk
        // (nobody holds its lock any more, so it is not in progress).
        for r in recs.iter().filter(|r| r.state == VmState::Created) {
            let dir = crate::backend::VmDir::of(&r.id);
            if !dir.disk().exists() && !super::VmLock::is_held(&r.id) {
                items.push(PruneItem {
                    kind: "broken VM (no disk)".into(),
                    id: r.id.clone(),
                    path: Some(dir.path().to_path_buf()),
                });
            }
        }
    }
    if dry_run {
        return Ok(items);
    }
    for it in &items {
        match it.kind.as_str() {
            "error VM" | "broken VM (no disk)" => {
                super::Sandbox::from_id(&it.id).await?.delete().await?
            }
            _ => {
                let _lock = super::VmLock::acquire(&it.id).await?;
                // Re-check under the lock: a create may have just made it.
                if Store::open()?.get(&it.id)?.is_some() {
                    continue;
                }
                if let Some(p) = &it.path {
                    let r = if p.is_dir() {
                        std::fs::remove_dir_all(p)
                    } else {
                        std::fs::remove_file(p)
                    };
                    match r {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(Error::io(format!("cannot remove {}", p.display()), e))
                        }
                    }
                }
            }
        }
    }
    Ok(items)
}
