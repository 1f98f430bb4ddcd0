//! The guest kernel: fetching Debian's kernel package with mmdebstrap,
//! turning its bzImage into an ELF `vmlinux` (QEMU boots that through PVH),
//! and picking out the modules the initramfs loads.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::modules;
use super::recipe::Recipe;
use super::run;
use super::ImageError;
use crate::hosttools;

/// Offset of `setup_sects` in the bzImage setup header.
const SETUP_SECTS: usize = 0x1f1;
/// Offset of the "HdrS" magic.
const HEADER_MAGIC: usize = 0x202;
/// Offset of the boot protocol version.
const PROTOCOL_VERSION: usize = 0x206;
/// Offsets of `payload_offset` / `payload_length` (boot protocol ≥ 2.08).
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;

/// Compression of a bzImage payload, from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    Lz4Legacy,
    Gzip,
    Xz,
    Zstd,
    Bzip2,
    Lzma,
    Lzo,
    Unknown,
}

impl Compression {
    pub(crate) fn detect(payload: &[u8]) -> Compression {
        match payload {
            [0x02, 0x21, 0x4c, 0x18, ..] => Compression::Lz4Legacy,
            [0x1f, 0x8b, ..] | [0x1f, 0x9e, ..] => Compression::Gzip,
            [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Compression::Xz,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            [b'B', b'Z', b'h', ..] => Compression::Bzip2,
            [0x5d, 0x00, 0x00, ..] => Compression::Lzma,
            [0x89, b'L', b'Z', b'O', ..] => Compression::Lzo,
            _ => Compression::Unknown,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Compression::Lz4Legacy => "lz4",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Lzo => "lzo",
            Compression::Unknown => "unknown",
        }
    }
}

/// The compressed kernel inside a bzImage.
pub(crate) fn bzimage_payload(image: &[u8]) -> Result<&[u8], String> {
    if image.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS setup header)".into());
    }
    let version = image
        .get(PROTOCOL_VERSION..PROTOCOL_VERSION + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    if version < 0x208 {
        return Err(format!(
            "boot protocol {}.{:02} has no payload fields (need 2.08+)",
            version >> 8,
            version & 0xff
        ));
    }
    let u32_at = |o: usize| -> Option<usize> {
        let b = image.get(o..o + 4)?;
        usize::try_from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok()
    };
    let setup_sects = match image[SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let offset = u32_at(PAYLOAD_OFFSET).ok_or("truncated setup header")?;
    let length = u32_at(PAYLOAD_LENGTH).ok_or("truncated setup header")?;
    let start = (setup_sects + 1) * 512 + offset;
    start
        .checked_add(length)
        .and_then(|end| image.get(start..end))
        .ok_or_else(|| {
            format!(
                "payload {start}+{length} lies outside the {}-byte image",
                image.len()
            )
        })
}

/// Decompresses a bzImage payload with the matching host tool.
pub(crate) fn decompress_payload(payload: &[u8]) -> Result<Vec<u8>, ImageError> {
    let format = Compression::detect(payload);
    // Every format but gzip gets the uncompressed size appended as a
    // little-endian u32 by the kernel build (`size_append`); the tools would
    // take it for another frame, so strip it (and check it afterwards).
    let split_size = |p: &[u8]| -> (Vec<u8>, Option<usize>) {
        match p.len().checked_sub(4) {
            Some(n) => {
                let s = u32::from_le_bytes([p[n], p[n + 1], p[n + 2], p[n + 3]]);
                (p[..n].to_vec(), usize::try_from(s).ok())
            }
            None => (p.to_vec(), None),
        }
    };
    let (tool, args, ok_codes, input, expected): (&str, &[&str], &[i32], Vec<u8>, Option<usize>) =
        match format {
            Compression::Lz4Legacy => {
                let (input, size) = split_size(payload);
                ("lz4", &["-d", "-c"], &[], input, size)
            }
            // gzip exits 2 on "trailing garbage ignored", a warning.
            Compression::Gzip => ("gzip", &["-d", "-c"], &[2], payload.to_vec(), None),
            Compression::Xz => {
                let (input, size) = split_size(payload);
                ("xz", &["-d", "-c", "--single-stream"], &[], input, size)
            }
            Compression::Zstd => {
                let (input, size) = split_size(payload);
                ("zstd", &["-d", "-c", "-q"], &[], input, size)
            }
            other => {
                return Err(ImageError::UnsupportedCompression {
                    format: other.name().to_string(),
                })
            }
        };
    let exe = hosttools::require(tool)?;
    let out = run::filter(Command::new(exe).args(args), tool, &input, ok_codes)?;
    if let Some(expected) = expected {
        if out.len() != expected {
            return Err(ImageError::Command {
                tool: tool.to_string(),
                status: format!(
                    "produced {} bytes, the kernel header says {expected}",
                    out.len()
                ),
                tail: String::new(),
            });
        }
    }
    Ok(out)
}

/// Turns a bzImage into the ELF `vmlinux` it carries.
pub(crate) fn extract_vmlinux(bzimage: &Path) -> Result<Vec<u8>, ImageError> {
    let image = std::fs::read(bzimage)
        .map_err(ImageError::io(format!("cannot read {}", bzimage.display())))?;
    let bad = |reason: String| ImageError::BadKernel {
        path: bzimage.to_path_buf(),
        reason,
    };
    let payload = bzimage_payload(&image).map_err(bad)?;
    let elf = decompress_payload(payload)?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(bad("decompressed payload is not an ELF vmlinux".into()));
    }
    Ok(elf)
}

/// A fetched kernel, ready to be placed into an image.
#[derive(Debug)]
pub(crate) struct FetchedKernel {
    /// Kernel release, e.g. `6.1.0-28-cloud-amd64`.
    pub version: String,
    /// The bzImage (`/boot/vmlinuz-<version>`).
    pub bzimage: PathBuf,
    /// Modules in load order, with their files.
    pub modules: Vec<(String, PathBuf)>,
}

/// Fetches the recipe's kernel package into `work` (without touching the
/// host's apt) and resolves the wanted modules.
pub(crate) fn fetch(
    recipe: &Recipe,
    work: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<FetchedKernel, ImageError> {
    let mmdebstrap = hosttools::require("mmdebstrap")?;
    let out = work.join("kernel-tree");
    let mut cmd = Command::new(mmdebstrap);
    cmd.arg(format!("--mode={}", run::mmdebstrap_mode()))
        .arg("--variant=extract")
        .arg(format!("--include={}", recipe.kernel_package))
        .arg(format!(
            "--extract-hook=copy-out /boot /lib/modules {}",
            out.display()
        ))
        .arg(recipe.suite)
        .arg("/dev/null")
        .current_dir(work);
    run::run_streaming(
        &mut cmd,
        "mmdebstrap",
        &work.join("kernel-mmdebstrap.log"),
        log,
    )?;

    let boot = out.join("boot");
    let mut kernels: Vec<(String, PathBuf)> = std::fs::read_dir(&boot)
        .map_err(ImageError::io(format!("cannot read {}", boot.display())))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_string();
            Some((version, e.path()))
        })
        .collect();
    kernels.sort();
    let Some((version, bzimage)) = kernels.pop() else {
        return Err(ImageError::BadKernel {
            path: boot,
            reason: format!(
                "package {} installed no /boot/vmlinuz-*",
                recipe.kernel_package
            ),
        });
    };
    let module_dir = out.join("modules").join(&version);
    let modules = modules::resolve(&module_dir, recipe.modules)?;
    Ok(FetchedKernel {
        version,
        bzimage,
        modules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic bzImage: 2 setup sectors, header fields, then `payload`
    /// at `payload_offset` into the protected-mode part.
    fn fake_bzimage(setup_sects: u8, payload_offset: u32, payload: &[u8]) -> Vec<u8> {
        let sects = if setup_sects == 0 {
            4
        } else {
            usize::from(setup_sects)
        };
        let start = (sects + 1) * 512 + payload_offset as usize;
        let mut img = vec![0u8; start + payload.len() + 64];
        img[SETUP_SECTS] = setup_sects;
        img[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        img[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&payload_offset.to_le_bytes());
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img[start..start + payload.len()].copy_from_slice(payload);
        img
    }

    #[test]
    fn finds_the_payload() {
        let img = fake_bzimage(2, 0x100, b"PAYLOAD!");
        assert_eq!(bzimage_payload(&img).unwrap(), b"PAYLOAD!");
        // setup_sects == 0 means 4.
        let img = fake_bzimage(0, 7, b"xyz");
        assert_eq!(bzimage_payload(&img).unwrap(), b"xyz");
    }

    #[test]
    fn rejects_bad_headers() {
        assert!(bzimage_payload(b"short").is_err());
        let mut img = fake_bzimage(2, 0, b"p");
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(bzimage_payload(&img).unwrap_err().contains("outside"));
        let mut img = fake_bzimage(2, 0, b"p");
        img[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(bzimage_payload(&img).unwrap_err().contains("2.08"));
    }

    #[test]
    fn detects_compression() {
        assert_eq!(
            Compression::detect(&[0x02, 0x21, 0x4c, 0x18, 0]),
            Compression::Lz4Legacy
        );
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::detect(b"\xfd7zXZ\0"), Compression::Xz);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"hello"), Compression::Unknown);
        let err = decompress_payload(b"BZh91AY").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel payload is bzip2-compressed; only lz4, gzip, xz and zstd payloads are supported"
        );
    }

    fn compress(tool: &str, args: &[&str], data: &[u8]) -> Option<Vec<u8>> {
        let exe = hosttools::find(tool)?;
        run::filter(Command::new(exe).args(args), tool, data, &[]).ok()
    }

    #[test]
    fn decompresses_lz4_legacy_and_gzip_payloads() {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend((0..200_000u32).map(|i| (i % 251) as u8));
        if let Some(mut lz4) = compress("lz4", &["-l", "-c", "-9"], &elf) {
            lz4.extend((elf.len() as u32).to_le_bytes()); // the kernel's size_append
            let img = fake_bzimage(3, 0x2000, &lz4);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("vmlinuz");
            std::fs::write(&path, img).unwrap();
            assert_eq!(extract_vmlinux(&path).unwrap(), elf);
        }
        if let Some(gz) = compress("gzip", &["-c", "-n"], &elf) {
            assert_eq!(decompress_payload(&gz).unwrap(), elf);
        }
        // Wrong size trailer is caught.
        if let Some(mut lz4) = compress("lz4", &["-l", "-c"], &elf) {
            lz4.extend(7u32.to_le_bytes());
            assert!(decompress_payload(&lz4).is_err());
        }
    }
}
