//! `manifest.json`: what an image was built from and what it contains.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::recipe::hex;
use super::ImageError;

/// Bumped when the manifest's shape changes; other values are rebuilt.
pub const MANIFEST_FORMAT: u32 = 1;

/// File names inside an image directory.
pub const VMLINUX: &str = "vmlinux";
pub const INITRAMFS: &str = "initramfs.cpio";
pub const ROOTFS: &str = "rootfs.ext4";
pub const MANIFEST: &str = "manifest.json";
/// Directory of the image's kernel modules (kept for initramfs rebuilds).
pub const MODULES_DIR: &str = "modules";

/// An image's description, stored as `manifest.json` in its directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: u32,
    pub name: String,
    /// When the image was built (seconds since the Unix epoch).
    pub created_at: u64,
    /// When any part was last rebuilt (seconds since the Unix epoch).
    pub updated_at: u64,
    /// The smolvm version that last wrote this manifest.
    pub smolvm_version: String,
    /// Hash of the whole recipe; a mismatch means the image is outdated.
    pub recipe_hash: String,
    pub kernel: KernelInfo,
    pub rootfs: RootfsInfo,
    pub initramfs: InitramfsInfo,
    pub files: Files,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelInfo {
    /// Debian package the kernel came from.
    pub package: String,
    /// Kernel release, e.g. `6.1.0-28-cloud-amd64`.
    pub version: String,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
    pub recipe_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsInfo {
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// Packages asked for on top of `minbase`.
    pub packages: Vec<String>,
    /// Every installed package as `name version`.
    pub installed: Vec<String>,
    pub recipe_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitramfsInfo {
    pub agent_sha256: String,
    pub init_sha256: String,
    pub busybox_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Files {
    pub vmlinux: FileEntry,
    pub initramfs: FileEntry,
    pub rootfs: FileEntry,
}

/// Size and SHA-256 of one image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub size: u64,
    pub sha256: String,
}

impl FileEntry {
    /// Hashes `path`.
    pub fn of(path: &Path) -> Result<FileEntry, ImageError> {
        let (size, sha256) = sha256_file(path)?;
        Ok(FileEntry { size, sha256 })
    }

    /// Whether `path` exists with this entry's size.
    pub fn size_matches(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == self.size)
    }

    /// Whether `path` has this entry's size and hash.
    pub fn verify(&self, path: &Path) -> bool {
        self.size_matches(path) && sha256_file(path).is_ok_and(|(_, h)| h == self.sha256)
    }
}

/// Size and SHA-256 (hex) of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<(u64, String), ImageError> {
    let err = || ImageError::io(format!("cannot read {}", path.display()));
    let mut f = std::fs::File::open(path).map_err(err())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(err())?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&h.finalize())))
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), for days >= 0.
    let z = i64::try_from(days).unwrap_or(i64::MAX - 719_468) + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Manifest {
    /// Reads `<dir>/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, ImageError> {
        let path = dir.join(MANIFEST);
        let bytes = std::fs::read(&path)
            .map_err(ImageError::io(format!("cannot read {}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Manifest { path, source })
    }

    /// Writes `<dir>/manifest.json` atomically (temp file, fsync, rename).
    pub fn save(&self, dir: &Path) -> Result<(), ImageError> {
        let path = dir.join(MANIFEST);
        let tmp = dir.join(format!(".{MANIFEST}.tmp-{}", std::process::id()));
        let mut json = serde_json::to_vec_pretty(self).map_err(|source| ImageError::Manifest {
            path: path.clone(),
            source,
        })?;
        json.push(b'\n');
        write_atomic(&tmp, &path, &json)
    }

    /// Module files of this image, in load order.
    pub fn module_files(&self, dir: &Path) -> Vec<(String, PathBuf)> {
        self.kernel
            .modules
            .iter()
            .map(|m| (m.clone(), dir.join(MODULES_DIR).join(format!("{m}.ko"))))
            .collect()
    }
}

/// Writes `data` to `tmp`, fsyncs it and renames it over `dest`.
pub(crate) fn write_atomic(tmp: &Path, dest: &Path, data: &[u8]) -> Result<(), ImageError> {
    let err = |what: &str| ImageError::io(format!("cannot {what} {}", dest.display()));
    let result = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(tmp).map_err(err("write"))?;
        f.write_all(data).map_err(err("write"))?;
        f.sync_all().map_err(err("write"))?;
        std::fs::rename(tmp, dest).map_err(err("replace"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Parses a dpkg status file into `name version` for installed packages.
pub(crate) fn installed_packages(status: &str) -> Vec<String> {
    let mut out = Vec::new();
    for para in status.split("\n\n") {
        let (mut name, mut version, mut installed) = (None, None, false);
        for line in para.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.trim().ends_with(" installed");
            }
        }
        if let (Some(n), Some(v), true) = (name, version, installed) {
            out.push(format!("{n} {v}"));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn parses_dpkg_status() {
        let status = "Package: bash\nStatus: install ok installed\nVersion: 5.2.15-2+b2\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                      Package: apt\nStatus: install ok installed\nVersion: 2.6.1\nDescription: x\n y\n";
        assert_eq!(
            installed_packages(status),
            ["apt 2.6.1", "bash 5.2.15-2+b2"]
        );
    }

    #[test]
    fn manifest_round_trips_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, b"abc").unwrap();
        let entry = FileEntry::of(&f).unwrap();
        assert_eq!(entry.size, 3);
        assert!(entry.verify(&f));
        let m = Manifest {
            format: MANIFEST_FORMAT,
            name: "debian-12".into(),
            created_at: 1,
            updated_at: 2,
            smolvm_version: "0.1.0".into(),
            recipe_hash: "r".into(),
            kernel: KernelInfo {
                package: "linux-image-cloud-amd64".into(),
                version: "6.1.0-1-cloud-amd64".into(),
                modules: vec!["virtio".into()],
                recipe_hash: "k".into(),
            },
            rootfs: RootfsInfo {
                suite: "bookworm".into(),
                packages: vec!["python3".into()],
                installed: vec![],
                recipe_hash: "f".into(),
            },
            initramfs: InitramfsInfo {
                agent_sha256: "a".into(),
                init_sha256: "i".into(),
                busybox_sha256: "b".into(),
            },
            files: Files {
                vmlinux: entry.clone(),
                initramfs: entry.clone(),
                rootfs: entry,
            },
        };
        m.save(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
        assert_eq!(
            m.module_files(dir.path()),
            [("virtio".to_string(), dir.path().join("modules/virtio.ko"))]
        );
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(MANIFEST)).unwrap()).unwrap();
        v["surprise"] = 1.into();
        std::fs::write(dir.path().join(MANIFEST), v.to_string()).unwrap();
        assert!(matches!(
            Manifest::load(dir.path()),
            Err(ImageError::Manifest { .. })
        ));
    }
}
