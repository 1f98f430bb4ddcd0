//! Snapshots on disk: one directory per snapshot under
//! `<data_dir>/snapshots/<uid>`, its `manifest.json` written last (the
//! commit point: a directory without one is not a snapshot), and the
//! collection of directories nothing uses any more. See docs/snapshots.md.
//!
//! What uses a snapshot is read from the disks themselves: every VM disk
//! and every snapshot disk is a qcow2 layer whose backing chain names the
//! frozen disks under it, so a directory is in use exactly while some
//! chain passes through its `disk.qcow2` — no second record to drift.

pub mod qcow2;

use crate::config::SandboxConfig;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Version of the snapshot directory format.
pub const FORMAT: u32 = 1;

/// The files of a snapshot directory.
pub mod files {
    pub const MANIFEST: &str = "manifest.json";
    pub use crate::backend::{SNAPSHOT_MEMORY as MEMORY, SNAPSHOT_STATE as STATE};
    /// The frozen root disk (a qcow2 layer).
    pub const DISK: &str = "disk.qcow2";
    /// The image root filesystem under it (hard link).
    pub const BASE: &str = "base.ext4";
    pub const KERNEL: &str = "vmlinux";
    pub const INITRAMFS: &str = "initramfs.cpio";
}

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Memory, device state and disk of a running or paused VM.
    Full,
    /// The disk of a stopped VM (restores boot it).
    Disk,
    /// A boot snapshot that fresh sandboxes of one image and shape start
    /// from (internal; shown by `smolvm image ls`).
    Warm,
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Disk => "disk",
            SnapshotKind::Warm => "warm",
        })
    }
}

/// Identity of a host file (an image part, the VMM binary): a rebuilt
/// image or an upgraded QEMU is a new file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct FileId {
    pub size: u64,
    pub mtime_ns: i64,
    pub ino: u64,
}

impl FileId {
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        let m = std::fs::metadata(path)?;
        Ok(FileId {
            size: m.size(),
            mtime_ns: m
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
            ino: m.ino(),
        })
    }
}

/// The machine a snapshot's device state loads into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub backend: crate::backend::BackendKind,
    pub accel: crate::backend::ResolvedAccel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub network: bool,
    /// The VMM binary that wrote the state (only it can load it).
    pub vmm: FileId,
    pub vmm_path: PathBuf,
    /// The machine layout (`backend::MACHINE_ABI`) the state belongs to.
    #[serde(default = "first_abi")]
    pub machine_abi: u32,
}

fn first_abi() -> u32 {
    1
}

/// Size and SHA-256 of a small file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The snapshot's id (the VM naming rule).
    pub id: String,
    pub kind: SnapshotKind,
    pub created_at_ms: i64,
    pub source_vm: String,
    /// The source VM's creation time (tells it from a later VM of the
    /// same name).
    pub source_created_at: i64,
    /// The source's configuration (restores get it, with their own name).
    pub config: SandboxConfig,
    pub image: String,
    /// Absent for disk-only snapshots.
    pub machine: Option<Machine>,
    /// Device state (absent for disk-only snapshots).
    pub state: Option<Checked>,
    /// Guest RAM is inside `state` rather than in `memory`.
    #[serde(default)]
    pub memory_in_state: bool,
    /// Length of `memory` (the guest's RAM size) and bytes allocated.
    pub memory_len: Option<u64>,
    pub memory_bytes: u64,
    pub disk_virtual_size: u64,
    /// Bytes of the frozen disk layer itself.
    pub disk_bytes: u64,
    pub kernel: Option<Checked>,
    pub initramfs: Option<Checked>,
    /// Warm snapshots: the shape key they serve.
    #[serde(default)]
    pub warm_key: Option<String>,
    /// The port forwards of the source's run (full snapshots): a restore
    /// opens them again (on free host ports when it is another VM).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<crate::config::PortForward>,
}

/// A snapshot as listed.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub kind: SnapshotKind,
    pub source_vm: String,
    pub created_at_ms: i64,
    pub image: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Bytes on disk: state + RAM + the frozen disk layer.
    pub size_bytes: u64,
    pub state_bytes: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// VMs whose disk is layered on this snapshot.
    pub used_by: Vec<String>,
    pub dir: PathBuf,
}

/// A committed snapshot: its directory and manifest.
#[derive(Debug, Clone)]
pub struct Stored {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Stored {
    pub fn info(&self) -> SnapshotInfo {
        let m = &self.manifest;
        let state_bytes = m.state.as_ref().map_or(0, |s| s.bytes);
        SnapshotInfo {
            id: m.id.clone(),
            kind: m.kind,
            source_vm: m.source_vm.clone(),
            created_at_ms: m.created_at_ms,
            image: m.image.clone(),
            memory_mib: m.config.memory_mib,
            cpus: m.config.cpus,
            size_bytes: state_bytes + m.memory_bytes + m.disk_bytes,
            state_bytes,
            memory_bytes: m.memory_bytes,
            disk_bytes: m.disk_bytes,
            used_by: users(&self.dir),
            dir: self.dir.clone(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let c = context.into();
    move |e| Error::io(c, e)
}

/// Serialises snapshot creation, removal and collection across processes.
pub struct SnapshotsLock(#[allow(dead_code)] crate::sandbox::VmLock);

/// Takes the snapshots lock (waits while another process holds it).
pub async fn lock() -> Result<SnapshotsLock> {
    let root = crate::paths::snapshots_dir();
    crate::private::dir_all(&root).map_err(io(format!("cannot create {}", root.display())))?;
    let l = crate::sandbox::VmLock::acquire_at(&root.join(".lock"), "snapshots").await?;
    Ok(SnapshotsLock(l))
}

/// Takes the snapshots lock shared (restores: many at once; no snapshot
/// is retired or collected meanwhile).
pub async fn lock_shared() -> Result<SnapshotsLock> {
    let root = crate::paths::snapshots_dir();
    crate::private::dir_all(&root).map_err(io(format!("cannot create {}", root.display())))?;
    let l = crate::sandbox::VmLock::acquire_shared_at(&root.join(".lock"), "snapshots").await?;
    Ok(SnapshotsLock(l))
}

/// A fresh, empty snapshot directory (no manifest yet: not a snapshot).
pub fn new_dir(_lock: &SnapshotsLock) -> Result<PathBuf> {
    let root = crate::paths::snapshots_dir();
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd)
        .map_err(|e| Error::io("no randomness", std::io::Error::other(e.to_string())))?;
    let uid: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    let dir = root.join(uid);
    crate::private::dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    Ok(dir)
}

/// The backing name a layer in a VM or snapshot directory uses for the
/// frozen disk in `snap_dir` (both sit two levels under the data dir, so
/// the relative name holds wherever the data dir moves).
pub fn backing_name(snap_dir: &Path) -> String {
    let uid = snap_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("../../snapshots/{uid}/{}", files::DISK)
}

/// Every committed snapshot (warm ones included).
pub fn all() -> Vec<Stored> {
    let root = crate::paths::snapshots_dir();
    let Ok(rd) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let dir = e.path();
        if e.file_name().to_string_lossy().starts_with('.') || !dir.is_dir() {
            continue;
        }
        let Ok(bytes) = std::fs::read(dir.join(files::MANIFEST)) else {
            continue;
        };
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(manifest) => out.push(Stored { dir, manifest }),
            Err(e) => tracing::warn!("ignoring {}: unreadable manifest: {e}", dir.display()),
        }
    }
    out.sort_by_key(|s| s.manifest.created_at_ms);
    out
}

/// The user-visible snapshots (not warm ones).
pub fn list() -> Vec<Stored> {
    all()
        .into_iter()
        .filter(|s| s.manifest.kind != SnapshotKind::Warm)
        .collect()
}

/// The snapshot named `id`.
pub fn find(id: &str) -> Result<Stored> {
    crate::config::validate_name(id).map_err(|_| Error::SnapshotNotFound(id.to_string()))?;
    list()
        .into_iter()
        .find(|s| s.manifest.id == id)
        .ok_or_else(|| Error::SnapshotNotFound(id.to_string()))
}

/// Writes `m` as the manifest of `dir`, making it a snapshot: after the
/// files it names are synced.
pub fn commit(dir: &Path, m: &Manifest) -> Result<()> {
    for f in [files::STATE, files::MEMORY, files::DISK] {
        if let Ok(file) = std::fs::File::open(dir.join(f)) {
            file.sync_all()
                .map_err(io(format!("cannot sync {}", dir.join(f).display())))?;
        }
    }
    let bytes = serde_json::to_vec_pretty(m)
        .map_err(|e| Error::io("cannot encode the manifest", e.into()))?;
    let path = dir.join(files::MANIFEST);
    crate::private::write_atomic(&path, &bytes)
        .map_err(io(format!("cannot write {}", path.display())))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// SHA-256 and size of a file.
pub fn checked(path: &Path) -> Result<Checked> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(io(format!("cannot read {}", path.display())))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io(format!("cannot read {}", path.display())))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        h.update(&buf[..n]);
    }
    Ok(Checked {
        bytes,
        sha256: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// Bytes a file occupies on disk.
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Checks that everything a restore of `s` needs is present and whole,
/// and that this host's VMM can load it. Nothing is changed.
pub fn verify(s: &Stored) -> Result<()> {
    let m = &s.manifest;
    let invalid = |reason: String| Error::SnapshotInvalid {
        id: m.id.clone(),
        reason,
    };
    if m.format != FORMAT {
        return Err(invalid(format!(
            "it is in snapshot format {}, this smolvm reads format {FORMAT}",
            m.format
        )));
    }
    let disk = s.path(files::DISK);
    let h = qcow2::header(&disk).map_err(|e| invalid(format!("its disk: {e}")))?;
    for layer in qcow2::chain(&disk) {
        if !layer.exists() {
            return Err(invalid(format!(
                "a layer under its disk is missing: {}",
                layer.display()
            )));
        }
    }
    if h.virtual_size != m.disk_virtual_size {
        return Err(invalid("its disk is not the one it was taken with".into()));
    }
    if m.kind == SnapshotKind::Disk {
        return Ok(());
    }
    let Some(machine) = &m.machine else {
        return Err(invalid("its manifest names no machine".into()));
    };
    let Some(state) = &m.state else {
        return Err(invalid("its manifest names no device state".into()));
    };
    let got = checked(&s.path(files::STATE)).map_err(|e| invalid(crate::error::chain(&e)))?;
    if got != *state {
        return Err(invalid(format!(
            "its device state is damaged ({} bytes, expected {}; checksum {})",
            got.bytes,
            state.bytes,
            if got.sha256 == state.sha256 {
                "matches"
            } else {
                "differs"
            }
        )));
    }
    if !m.memory_in_state {
        let want = m.memory_len.unwrap_or(0);
        let len = std::fs::metadata(s.path(files::MEMORY)).map(|md| md.len());
        match len {
            Ok(l) if l == want && want == u64::from(machine.memory_mib) << 20 => {}
            Ok(l) => {
                return Err(invalid(format!(
                    "its memory file is {l} bytes, expected {} (truncated or replaced)",
                    u64::from(machine.memory_mib) << 20
                )))
            }
            Err(e) => return Err(invalid(format!("its memory file is missing ({e})"))),
        }
    }
    for (name, want) in [(files::KERNEL, &m.kernel), (files::INITRAMFS, &m.initramfs)] {
        let Some(want) = want else { continue };
        let len = std::fs::metadata(s.path(name))
            .map(|md| md.len())
            .unwrap_or(u64::MAX);
        if len != want.bytes {
            return Err(invalid(format!("its {name} is missing or damaged")));
        }
    }
    if machine.machine_abi != crate::backend::MACHINE_ABI {
        return Err(invalid(format!(
            "it was made for machine layout {} and this smolvm builds layout {}; \
             device state only loads into the machine it came from — take a new snapshot",
            machine.machine_abi,
            crate::backend::MACHINE_ABI
        )));
    }
    match FileId::of(&machine.vmm_path) {
        Ok(id) if id == machine.vmm => Ok(()),
        Ok(_) => Err(invalid(format!(
            "it was made by another build of the VMM ({}, since upgraded or replaced); \
             device state only loads into the VMM that wrote it — take a new snapshot",
            machine.vmm_path.display()
        ))),
        Err(e) => Err(invalid(format!(
            "the VMM that made it ({}) is gone: {e}",
            machine.vmm_path.display()
        ))),
    }
}

/// Names of the VMs whose disk chain passes through `dir`'s disk.
pub fn users(dir: &Path) -> Vec<String> {
    let disk = dir.join(files::DISK);
    let Ok(target) = std::fs::metadata(&disk) else {
        return Vec::new();
    };
    let vms = crate::paths::data_dir().join("vms");
    let mut out = Vec::new();
    for e in std::fs::read_dir(vms).into_iter().flatten().flatten() {
        let vm = crate::backend::VmDir::at(e.path());
        let uses = vm_layers(&vm).iter().any(|l| same_file(l, &target));
        if uses {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// Every layer a VM's disk stands on, its own layers included (the top a
/// running snapshotted VMM writes, and the disk).
fn vm_layers(vm: &crate::backend::VmDir) -> Vec<PathBuf> {
    vm_layers_checked(vm).0
}

/// [`vm_layers`], and whether every chain was read whole.
fn vm_layers_checked(vm: &crate::backend::VmDir) -> (Vec<PathBuf>, bool) {
    let mut out = Vec::new();
    let mut whole = true;
    for top in [vm.current_disk(), vm.disk()] {
        out.push(top.clone());
        let (c, ok) = qcow2::chain_checked(&top);
        whole &= ok;
        out.extend(c);
    }
    (out, whole)
}

fn same_file(p: &Path, m: &std::fs::Metadata) -> bool {
    std::fs::metadata(p).is_ok_and(|x| x.ino() == m.ino() && x.dev() == m.dev())
}

/// Removes the snapshot `s` from the list. Its files go now when nothing is
/// layered on it, else when the last VM using it is deleted. Returns the
/// VMs that keep it.
pub fn retire(lock: &SnapshotsLock, s: &Stored) -> Result<Vec<String>> {
    let m = s.path(files::MANIFEST);
    std::fs::remove_file(&m).map_err(io(format!("cannot remove {}", m.display())))?;
    let users = users(&s.dir);
    collect(lock);
    Ok(users)
}

/// Removes every snapshot directory that is not committed and that no
/// VM's or committed snapshot's disk chain passes through (what a
/// retired snapshot, a crash mid-snapshot or a failed one leaves).
pub fn collect(_lock: &SnapshotsLock) {
    let root = crate::paths::snapshots_dir();
    let Ok(rd) = std::fs::read_dir(&root) else {
        return;
    };
    // Every layer in use: the chains of all VM disks and committed snapshots.
    let mut in_use: Vec<(u64, u64)> = Vec::new();
    let vms = crate::paths::data_dir().join("vms");
    let mut layers: Vec<PathBuf> = Vec::new();
    let mut whole = true;
    for e in std::fs::read_dir(vms).into_iter().flatten().flatten() {
        let (l, ok) = vm_layers_checked(&crate::backend::VmDir::at(e.path()));
        whole &= ok;
        layers.extend(l);
    }
    for s in all() {
        let top = s.path(files::DISK);
        let (l, ok) = qcow2::chain_checked(&top);
        whole &= ok;
        layers.extend(l);
        layers.push(top);
    }
    if !whole {
        // A chain that could not be read to its end may pass through any
        // directory: remove nothing rather than a layer still in use.
        tracing::warn!("a disk chain could not be read whole; no snapshot directory is removed");
        return;
    }
    for l in &layers {
        if let Ok(m) = std::fs::metadata(l) {
            in_use.push((m.dev(), m.ino()));
        }
    }
    for e in rd.flatten() {
        let dir = e.path();
        if e.file_name().to_string_lossy().starts_with('.') || !dir.is_dir() {
            continue;
        }
        if dir.join(files::MANIFEST).exists() {
            continue;
        }
        let used = std::fs::metadata(dir.join(files::DISK))
            .is_ok_and(|m| in_use.contains(&(m.dev(), m.ino())));
        if used {
            // Only its disk is needed (VMs are layered on it): the RAM and
            // device state go unless a running VM maps them.
            trim(&dir);
        } else {
            tracing::debug!("removing unused snapshot directory {}", dir.display());
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Removes the RAM and device state of an uncommitted snapshot directory
/// unless a VM that is up was restored from them (its RAM maps the file).
fn trim(dir: &Path) {
    let vms = crate::paths::data_dir().join("vms");
    let mapped = std::fs::read_dir(vms)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let vm = crate::backend::VmDir::at(e.path());
            let up = vm.supervisor_socket().exists();
            let spec: Option<crate::backend::LaunchSpec> = std::fs::read(vm.launch_spec())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            up && spec.and_then(|s| s.restore).is_some_and(|r| {
                r.state.starts_with(dir) || r.memory.is_some_and(|m| m.starts_with(dir))
            })
        });
    if !mapped {
        let _ = std::fs::remove_file(dir.join(files::MEMORY));
        let _ = std::fs::remove_file(dir.join(files::STATE));
    }
}

/// Links `src` to `dst` (same filesystem), else copies it; `dst` is private.
pub fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    if std::fs::hard_link(src, dst).is_ok() {
        // The inode is shared with the cache's file: tighten it there too
        // (files smolvm writes are the owner's alone; caches made by older
        // versions were not).
        let _ = crate::private::tighten(dst, crate::private::FILE_MODE);
        return Ok(());
    }
    let mut i = std::fs::File::open(src).map_err(io(format!("cannot read {}", src.display())))?;
    let mut o =
        crate::private::create_new(dst).map_err(io(format!("cannot create {}", dst.display())))?;
    std::io::copy(&mut i, &mut o).map_err(io(format!("cannot copy {}", src.display())))?;
    Ok(())
}

/// A warm snapshot of one image and machine shape, if committed.
pub fn find_warm(key: &str) -> Option<Stored> {
    all().into_iter().find(|s| {
        s.manifest.kind == SnapshotKind::Warm && s.manifest.warm_key.as_deref() == Some(key)
    })
}

/// The warm snapshots, for `smolvm image ls`.
pub fn warm() -> Vec<Stored> {
    all()
        .into_iter()
        .filter(|s| s.manifest.kind == SnapshotKind::Warm)
        .collect()
}
