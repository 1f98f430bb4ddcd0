//! Guest images: kernel (`vmlinux`), initramfs and ext4 root filesystem,
//! built from Debian packages on the host and cached under
//! `paths::images_dir()/<name>/`.
//!
//! Start with [`ensure`] (returns a bootable [`Image`], building what is
//! missing or stale) or [`build`] (explicit, verifying) — both report
//! progress through [`ImageEvent`]s.

mod build;
#[cfg(test)]
mod e2e_tests;
mod error;
mod initramfs;
mod inventory;
mod kernel;
mod manifest;
mod modules;
mod recipe;
mod rootfs;
mod run;
mod store;
mod types;

pub use build::{build, ensure};
pub use error::ImageError;
pub use inventory::{list, remove};
pub use manifest::{
    format_utc, sha256_file, FileEntry, Files, InitramfsInfo, KernelInfo, Manifest, RootfsInfo,
    INITRAMFS, MANIFEST, MANIFEST_FORMAT, MODULES_DIR, ROOTFS, VMLINUX,
};
pub use recipe::{known_images, DEFAULT_IMAGE};
pub use types::{BuildOptions, BuildOutcome, Image, ImageEvent, ImageInfo};
