//! SQLite inventory at `<data_dir>/smolvm.db`: WAL, busy timeout, schema
//! versioned by `PRAGMA user_version`.

use super::ProcessId;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Migrations, applied in order; `user_version` = number applied.
const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE vms (
        id               TEXT PRIMARY KEY,
        state            TEXT NOT NULL,
        config           TEXT NOT NULL,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL,
        supervisor_pid   INTEGER,
        supervisor_start INTEGER,
        vmm_pid          INTEGER,
        vmm_start        INTEGER,
        accel            TEXT,
        last_error       TEXT,
        boot_count       INTEGER NOT NULL DEFAULT 0
    );",
];

const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state store query failed")]
    Sql(#[from] rusqlite::Error),
    #[error("the state store {path} has schema version {found}, newer than this smolvm understands ({known}); upgrade smolvm")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("VM '{0}' already exists; choose another name or remove it with `smolvm rm {0}`")]
    AlreadyExists(String),
    #[error("corrupt row for VM '{id}': {reason}")]
    Corrupt { id: String, reason: String },
}

/// The lifecycle state of a VM as recorded in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Created,
    Running,
    Paused,
    Stopped,
    Error,
}

impl VmState {
    pub fn as_str(&self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
        }
    }

    fn parse(s: &str) -> Option<VmState> {
        Some(match s {
            "created" => VmState::Created,
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "stopped" => VmState::Stopped,
            "error" => VmState::Error,
            _ => return None,
        })
    }

    /// States in which a supervisor and VMM should be alive.
    pub fn is_live(&self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub state: VmState,
    /// The `SandboxConfig` as JSON.
    pub config: String,
    /// Unix ms.
    pub created_at: i64,
    pub updated_at: i64,
    pub supervisor: Option<ProcessId>,
    pub vmm: Option<ProcessId>,
    pub accel: Option<String>,
    pub last_error: Option<String>,
    pub boot_count: i64,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A connection to the state store. Cheap to open; open one per operation
/// or per thread (connections are not shared between threads).
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating and migrating when needed) the store at the default
    /// location.
    pub fn open() -> Result<Store, StoreError> {
        Self::open_at(&crate::paths::db_path())
    }

    pub fn open_at(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent() {
            crate::private::dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // SQLite gives its -wal and -shm files the database file's mode.
        let _ = crate::private::tighten(path, crate::private::FILE_MODE);
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // journal_mode returns a row; WAL persists in the file.
        let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")?;
        let mut store = Store { conn };
        store.migrate(path)?;
        Ok(store)
    }

    fn migrate(&mut self, path: &Path) -> Result<(), StoreError> {
        let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > known {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        if version == known {
            return Ok(());
        }
        // IMMEDIATE takes the write lock up front so two processes migrating
        // at once serialize instead of failing.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        // 0 <= version < known here.
        let done = usize::try_from(version).unwrap_or(0);
        for (i, m) in MIGRATIONS.iter().enumerate().skip(done) {
            tx.execute_batch(m)?;
            tx.pragma_update(
                None,
                "user_version",
                i64::try_from(i + 1).unwrap_or(i64::MAX),
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Inserts a new VM in state `created`. With `name`, that exact id (a
    /// duplicate is refused); without, a fresh unique `sbx-xxxxxxxx`.
    pub fn insert_new(&self, name: Option<&str>, config_json: &str) -> Result<String, StoreError> {
        let now = now_ms();
        let insert = |id: &str| {
            self.conn.execute(
                "INSERT INTO vms (id, state, config, created_at, updated_at) VALUES (?1, 'created', ?2, ?3, ?3)",
                params![id, config_json, now],
            )
        };
        if let Some(name) = name {
            return match insert(name) {
                Ok(_) => Ok(name.to_string()),
                Err(e) if is_constraint(&e) => Err(StoreError::AlreadyExists(name.to_string())),
                Err(e) => Err(e.into()),
            };
        }
        loop {
            let id = random_id();
            match insert(&id) {
                Ok(_) => return Ok(id),
                Err(e) if is_constraint(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM vms WHERE id = ?1"),
                [id],
                raw_row,
            )
            .optional()?;
        row.map(into_record).transpose()
    }

    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM vms ORDER BY created_at, id"
        ))?;
        let rows = stmt
            .query_map([], raw_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(into_record).collect()
    }

    /// Rewrites a VM's config JSON with `f` in one write transaction (so
    /// concurrent read-modify-writes from other processes never lose one
    /// another's changes). Only the VM created at `created_at` is touched:
    /// `Ok(false)` when that VM is gone. `f`'s error aborts the change.
    pub fn update_config<E: From<StoreError>>(
        &mut self,
        id: &str,
        created_at: i64,
        f: impl FnOnce(&str) -> Result<String, E>,
    ) -> Result<bool, E> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let cur: Option<String> = tx
            .query_row(
                "SELECT config FROM vms WHERE id = ?1 AND created_at = ?2",
                params![id, created_at],
                |r| r.get(0),
            )
            .optional()
            .map_err(StoreError::from)?;
        let Some(cur) = cur else {
            return Ok(false);
        };
        let new = f(&cur)?;
        tx.execute(
            "UPDATE vms SET config = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, new, now_ms()],
        )
        .map_err(StoreError::from)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(true)
    }

    /// Sets the state unconditionally.
    pub fn set_state(
        &self,
        id: &str,
        state: VmState,
        last_error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE vms SET state = ?2, last_error = COALESCE(?3, last_error), updated_at = ?4 WHERE id = ?1",
            params![id, state.as_str(), last_error, now_ms()],
        )?;
        Ok(())
    }

    /// Moves to `to` only when the current state is one of `from`; returns
    /// whether it did. Used where another process may have moved first.
    pub fn transition(
        &self,
        id: &str,
        from: &[VmState],
        to: VmState,
        last_error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let placeholders = (0..from.len())
            .map(|i| format!("?{}", i + 5))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "UPDATE vms SET state = ?2, last_error = COALESCE(?3, last_error), updated_at = ?4 \
             WHERE id = ?1 AND state IN ({placeholders})"
        );
        let mut values: Vec<Box<dyn rusqlite::ToSql>> = vec![
            Box::new(id.to_string()),
            Box::new(to.as_str()),
            Box::new(last_error.map(str::to_string)),
            Box::new(now_ms()),
        ];
        for f in from {
            values.push(Box::new(f));
        }
        let n = self.conn.execute(
            &sql,
            rusqlite::params_from_iter(values.iter().map(|b| b.as_ref())),
        )?;
        Ok(n > 0)
    }

    /// Records the processes of a (re)started VM and clears the last error.
    pub fn set_processes(
        &self,
        id: &str,
        supervisor: Option<ProcessId>,
        vmm: Option<ProcessId>,
        accel: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE vms SET supervisor_pid = ?2, supervisor_start = ?3, vmm_pid = ?4, vmm_start = ?5, \
             accel = COALESCE(?6, accel), updated_at = ?7 WHERE id = ?1",
            params![
                id,
                supervisor.map(|p| p.pid),
                // Start times are clock ticks since boot: far below i64::MAX.
                supervisor.map(|p| p.start_time.cast_signed()),
                vmm.map(|p| p.pid),
                vmm.map(|p| p.start_time.cast_signed()),
                accel,
                now_ms()
            ],
        )?;
        Ok(())
    }

    /// Marks the start of a boot: bumps the boot counter, clears the error.
    pub fn begin_boot(&self, id: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE vms SET boot_count = boot_count + 1, last_error = NULL, updated_at = ?2 WHERE id = ?1",
            params![id, now_ms()],
        )?;
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute("DELETE FROM vms WHERE id = ?1", [id])? > 0)
    }
}

const COLUMNS: &str =
    "id, state, config, created_at, updated_at, supervisor_pid, supervisor_start, \
                       vmm_pid, vmm_start, accel, last_error, boot_count";

type RawRow = (
    String,
    String,
    String,
    i64,
    i64,
    Option<u32>,
    Option<i64>,
    Option<u32>,
    Option<i64>,
    Option<String>,
    Option<String>,
    i64,
);

fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
    ))
}

fn into_record(r: RawRow) -> Result<VmRecord, StoreError> {
    let (id, state, config, created_at, updated_at, sp, ss, vp, vs, accel, last_error, boot_count) =
        r;
    let state = VmState::parse(&state).ok_or_else(|| StoreError::Corrupt {
        id: id.clone(),
        reason: format!("unknown state {state:?}"),
    })?;
    let pid = |p: Option<u32>, s: Option<i64>| match (p, s) {
        (Some(pid), Some(start)) => Some(ProcessId {
            pid,
            start_time: start.cast_unsigned(),
        }),
        _ => None,
    };
    Ok(VmRecord {
        id,
        state,
        config,
        created_at,
        updated_at,
        supervisor: pid(sp, ss),
        vmm: pid(vp, vs),
        accel,
        last_error,
        boot_count,
    })
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

/// `sbx-` + 8 random hex digits (uniqueness is enforced by the primary key).
pub fn random_id() -> String {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        let n = now_ms().cast_unsigned() ^ (u64::from(std::process::id()) << 20);
        b.copy_from_slice(&n.to_le_bytes()[..4]);
    }
    format!("sbx-{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open_at(&d.path().join("smolvm.db")).unwrap();
        (d, s)
    }

    #[test]
    fn insert_get_list_delete() {
        let (_d, s) = store();
        let a = s.insert_new(None, "{}").unwrap();
        assert!(a.starts_with("sbx-") && a.len() == 12);
        let b = s.insert_new(Some("named"), "{\"cpus\":2}").unwrap();
        assert_eq!(b, "named");
        assert!(matches!(
            s.insert_new(Some("named"), "{}"),
            Err(StoreError::AlreadyExists(_))
        ));
        let r = s.get("named").unwrap().unwrap();
        assert_eq!(r.state, VmState::Created);
        assert_eq!(r.config, "{\"cpus\":2}");
        assert_eq!(s.list().unwrap().len(), 2);
        assert!(s.delete(&a).unwrap());
        assert!(!s.delete(&a).unwrap());
        assert!(s.get(&a).unwrap().is_none());
    }

    #[test]
    fn transitions_are_conditional() {
        let (_d, s) = store();
        let id = s.insert_new(None, "{}").unwrap();
        assert!(!s
            .transition(&id, &[VmState::Running], VmState::Stopped, None)
            .unwrap());
        s.set_state(&id, VmState::Running, None).unwrap();
        assert!(s
            .transition(
                &id,
                &[VmState::Running, VmState::Paused],
                VmState::Error,
                Some("boom")
            )
            .unwrap());
        let r = s.get(&id).unwrap().unwrap();
        assert_eq!(r.state, VmState::Error);
        assert_eq!(r.last_error.as_deref(), Some("boom"));
        s.begin_boot(&id).unwrap();
        let r = s.get(&id).unwrap().unwrap();
        assert_eq!(r.last_error, None);
        assert_eq!(r.boot_count, 1);
    }

    #[test]
    fn processes_round_trip_and_reopen_keeps_schema() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("smolvm.db");
        let id = {
            let s = Store::open_at(&path).unwrap();
            let id = s.insert_new(None, "{}").unwrap();
            let p = ProcessId {
                pid: 42,
                start_time: 7,
            };
            s.set_processes(&id, Some(p), Some(p), Some("tcg")).unwrap();
            id
        };
        let s = Store::open_at(&path).unwrap();
        let r = s.get(&id).unwrap().unwrap();
        assert_eq!(
            r.vmm,
            Some(ProcessId {
                pid: 42,
                start_time: 7
            })
        );
        assert_eq!(r.accel.as_deref(), Some("tcg"));
    }

    #[test]
    fn newer_schema_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("smolvm.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(
            Store::open_at(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
