//! The public shapes of the image API.

use std::path::PathBuf;
use std::time::Duration;

use super::manifest::{Manifest, INITRAMFS, ROOTFS, VMLINUX};

/// A built image, ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    /// `paths::images_dir()/<name>`.
    pub dir: PathBuf,
    /// ELF `vmlinux` (boots through PVH).
    pub kernel: PathBuf,
    /// Uncompressed newc initramfs with busybox, modules, `/init`, agent.
    pub initramfs: PathBuf,
    /// ext4 root filesystem; use it read-only (as a qcow2 backing file).
    pub rootfs: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    pub(crate) fn new(dir: PathBuf, manifest: Manifest) -> Image {
        Image {
            name: manifest.name.clone(),
            kernel: dir.join(VMLINUX),
            initramfs: dir.join(INITRAMFS),
            rootfs: dir.join(ROOTFS),
            dir,
            manifest,
        }
    }
}

/// Options of [`build`](super::build).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// Rebuild everything, ignoring what is cached.
    pub force: bool,
}

/// What a build ended up doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildOutcome {
    /// The cached image was current; nothing was rebuilt.
    UpToDate,
    /// Only the initramfs was rebuilt (new agent or init script).
    Initramfs,
    /// The image was (re)built; cached kernel or rootfs may have been reused.
    Built,
}

/// Progress of an image build, for a progress bar or a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageEvent {
    /// Step `index` (1-based) of `total` begins.
    Step {
        index: usize,
        total: usize,
        label: String,
    },
    /// A line of output from a tool (mmdebstrap's `I: downloading
    /// packages...`, apt's `Get:`) or a note from the build itself.
    Log(String),
    /// The build finished.
    Done {
        elapsed: Duration,
        outcome: BuildOutcome,
    },
}

/// One entry of [`list`](super::list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub name: String,
    pub dir: PathBuf,
    /// Bytes allocated on disk (the rootfs is sparse).
    pub size_on_disk: u64,
    /// Seconds since the Unix epoch; 0 when the manifest is unreadable.
    pub created_at: u64,
    pub kernel_version: String,
    /// First 12 hex digits of the agent's SHA-256 baked into the initramfs.
    pub agent_sha256_short: String,
    /// Why the image is unusable (unreadable manifest, unknown recipe,
    /// outdated recipe); `None` when it is fine.
    pub problem: Option<String>,
}
