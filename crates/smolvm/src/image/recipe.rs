//! What each known image is made of. A recipe is pure data; its hashes
//! decide which cached parts of an image are still valid.

use sha2::{Digest, Sha256};

use super::ImageError;

/// The image used when none is named.
pub const DEFAULT_IMAGE: &str = "debian-12";

/// The guest's `/init`, run from the initramfs on every boot.
pub(crate) const INIT_SH: &str = include_str!("init.sh");

/// mmdebstrap customize hook that trims the Debian tree and makes the ext4.
pub(crate) const ROOTFS_HOOK_SH: &str = include_str!("rootfs-hook.sh");

/// Bump when the way images are put together changes in a way the hashes
/// below cannot see (e.g. the vmlinux extraction or the ext4 sizing).
const PIPELINE_VERSION: u32 = 1;

/// How to build one image.
#[derive(Debug)]
pub(crate) struct Recipe {
    pub name: &'static str,
    /// Debian suite passed to mmdebstrap.
    pub suite: &'static str,
    /// Debian package providing the kernel and its modules.
    pub kernel_package: &'static str,
    /// Modules the initramfs loads (dependencies are added automatically).
    pub modules: &'static [&'static str],
    /// Packages installed on top of `minbase`.
    pub packages: &'static [&'static str],
    /// Paths dpkg never unpacks (keeps the image lean, like Debian's slim
    /// container images; later `apt-get install`s in the guest follow it too).
    pub dpkg_excludes: &'static [&'static str],
    /// Paths re-included after the excludes.
    pub dpkg_includes: &'static [&'static str],
    /// Label of the ext4 root filesystem.
    pub fs_label: &'static str,
}

const RECIPES: &[Recipe] = &[Recipe {
    name: "debian-12",
    suite: "bookworm",
    kernel_package: "linux-image-cloud-amd64",
    modules: &[
        "virtio_mmio",
        "virtio_blk",
        "virtio_console",
        "virtio_net",
        "vmw_vsock_virtio_transport",
        "fuse",
        "virtiofs",
        "overlay",
    ],
    // A workbench: the basics plus what agents reach for first (pip and
    // venv, git, jq, archives, an editor). mmdebstrap installs no Recommends.
    packages: &[
        "ca-certificates",
        "curl",
        "file",
        "git",
        "iproute2",
        "iputils-ping",
        "jq",
        "less",
        "nano",
        "netbase",
        "openssh-server",
        "procps",
        "python3",
        "python3-pip",
        "python3-venv",
        "sudo",
        "unzip",
        "xz-utils",
    ],
    dpkg_excludes: &[
        "/usr/share/doc/*",
        "/usr/share/man/*",
        "/usr/share/info/*",
        "/usr/share/locale/*",
        "/usr/share/lintian/*",
        "/usr/share/linda/*",
    ],
    dpkg_includes: &[
        "/usr/share/doc/*/copyright",
        "/usr/share/locale/locale.alias",
    ],
    fs_label: "smolvm-root",
}];

static NAMES: &[&str] = &["debian-12"];

/// Names of the images smolvm knows how to build.
pub fn known_images() -> &'static [&'static str] {
    NAMES
}

/// The recipe for `name`, or an error listing the known images.
pub(crate) fn get(name: &str) -> Result<&'static Recipe, ImageError> {
    RECIPES
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ImageError::UnknownImage {
            name: name.to_string(),
            known: known_images().join(", "),
        })
}

fn hash_lines(parts: &[String]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex(&h.finalize())
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// SHA-256 of a byte string, as lowercase hex.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

impl Recipe {
    /// Hash of everything that determines `vmlinux` and the module set.
    pub fn kernel_hash(&self) -> String {
        let mut parts = vec![
            format!("pipeline={PIPELINE_VERSION}"),
            format!("suite={}", self.suite),
            format!("kernel={}", self.kernel_package),
        ];
        parts.extend(self.modules.iter().map(|m| format!("module={m}")));
        hash_lines(&parts)
    }

    /// Hash of everything that determines `rootfs.ext4`.
    pub fn rootfs_hash(&self) -> String {
        let mut parts = vec![
            format!("pipeline={PIPELINE_VERSION}"),
            format!("suite={}", self.suite),
            format!("label={}", self.fs_label),
            format!("hook={}", sha256_hex(ROOTFS_HOOK_SH.as_bytes())),
        ];
        parts.extend(self.packages.iter().map(|p| format!("package={p}")));
        parts.extend(self.dpkg_excludes.iter().map(|p| format!("exclude={p}")));
        parts.extend(self.dpkg_includes.iter().map(|p| format!("include={p}")));
        hash_lines(&parts)
    }

    /// Hash of the whole recipe (kernel and rootfs).
    pub fn hash(&self) -> String {
        hash_lines(&[
            self.name.to_string(),
            self.kernel_hash(),
            self.rootfs_hash(),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_image_lists_known_ones() {
        let err = get("ubuntu-99").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown image `ubuntu-99`; known images: debian-12"
        );
        assert_eq!(get(DEFAULT_IMAGE).map(|r| r.name).ok(), Some(DEFAULT_IMAGE));
    }

    #[test]
    fn every_recipe_is_listed() {
        let names: Vec<_> = RECIPES.iter().map(|r| r.name).collect();
        assert_eq!(names, known_images());
    }

    #[test]
    fn hashes_are_stable_and_distinct() {
        let r = get(DEFAULT_IMAGE).unwrap();
        assert_eq!(r.hash(), r.hash());
        assert_eq!(r.kernel_hash().len(), 64);
        assert_ne!(r.kernel_hash(), r.rootfs_hash());
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
