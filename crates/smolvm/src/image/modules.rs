//! Kernel modules: reading a `.ko`'s `.modinfo`, finding modules in a
//! `/lib/modules/<version>` tree, and ordering them so dependencies load
//! first (Debian's package has no `modules.dep`, and the initramfs has no
//! `modprobe` logic, so we resolve it here).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::ImageError;

/// Canonical module name: the kernel treats `-` and `_` alike.
pub(crate) fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

fn u16_at(d: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(o..o + 2)?.try_into().ok()?))
}

fn u32_at(d: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(o..o + 4)?.try_into().ok()?))
}

fn u64_at(d: &[u8], o: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(d.get(o..o + 8)?.try_into().ok()?)).ok()
}

/// The bytes of the ELF64 section called `name`.
pub(crate) fn elf_section<'a>(elf: &'a [u8], name: &str) -> Result<&'a [u8], String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let bad = || "truncated ELF section table".to_string();
    let shoff = u64_at(elf, 0x28).ok_or_else(bad)?;
    let shentsize = usize::from(u16_at(elf, 0x3a).ok_or_else(bad)?);
    let shnum = usize::from(u16_at(elf, 0x3c).ok_or_else(bad)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e).ok_or_else(bad)?);
    if shentsize < 64 {
        return Err(bad());
    }
    let header = |i: usize| -> Option<(usize, &'a [u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name_off = u32_at(elf, h)? as usize;
        let off = u64_at(elf, h + 0x18)?;
        let size = u64_at(elf, h + 0x20)?;
        Some((name_off, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, strtab) = header(shstrndx).ok_or_else(bad)?;
    for i in 0..shnum {
        let (name_off, data) = header(i).ok_or_else(bad)?;
        let Some(rest) = strtab.get(name_off..) else {
            continue;
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if &rest[..end] == name.as_bytes() {
            return Ok(data);
        }
    }
    Err(format!("no {name} section"))
}

/// Values of `key` in a `.modinfo` section (NUL-separated `key=value`).
pub(crate) fn modinfo_values<'a>(modinfo: &'a [u8], key: &str) -> Vec<&'a str> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .filter_map(|entry| entry.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// The modules a `.modinfo` section says this module depends on.
pub(crate) fn depends(modinfo: &[u8]) -> Vec<String> {
    modinfo_values(modinfo, "depends")
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(canonical)
        .collect()
}

/// Every `*.ko` under `dir`, by canonical module name.
pub(crate) fn index(dir: &Path) -> Result<HashMap<String, PathBuf>, ImageError> {
    let mut found = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(ImageError::io(format!("cannot read {}", d.display())))?;
        for entry in entries {
            let entry = entry.map_err(ImageError::io(format!("cannot read {}", d.display())))?;
            let path = entry.path();
            let ft = entry
                .file_type()
                .map_err(ImageError::io(format!("cannot stat {}", path.display())))?;
            if ft.is_dir() {
                stack.push(path);
            } else if let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                found.insert(canonical(stem), path);
            }
        }
    }
    Ok(found)
}

/// Orders `wanted` and everything they depend on so that each module comes
/// after its dependencies; otherwise keeps the order of `wanted`.
/// `deps_of` returns a module's direct dependencies, or `None` when the
/// module does not exist.
pub(crate) fn load_order<F>(wanted: &[&str], mut deps_of: F) -> Result<Vec<String>, ImageError>
where
    F: FnMut(&str) -> Result<Option<Vec<String>>, ImageError>,
{
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    let mut marks: BTreeMap<String, Mark> = BTreeMap::new();
    let mut order = Vec::new();
    // Iterative DFS: (module, its dependencies, next dependency index).
    for root in wanted {
        let root = canonical(root);
        if marks.get(&root) == Some(&Mark::Done) {
            continue;
        }
        let mut stack: Vec<(String, Vec<String>, usize)> = Vec::new();
        let deps = deps_of(&root)?.ok_or_else(|| missing(&root))?;
        marks.insert(root.clone(), Mark::Visiting);
        stack.push((root, deps, 0));
        while let Some((name, deps, next)) = stack.last_mut() {
            if let Some(dep) = deps.get(*next).cloned() {
                *next += 1;
                match marks.get(&dep) {
                    Some(Mark::Done) => {}
                    Some(Mark::Visiting) => return Err(ImageError::ModuleCycle(dep)),
                    None => {
                        let dep_deps = deps_of(&dep)?.ok_or_else(|| missing(&dep))?;
                        marks.insert(dep.clone(), Mark::Visiting);
                        stack.push((dep, dep_deps, 0));
                    }
                }
            } else {
                let name = std::mem::take(name);
                marks.insert(name.clone(), Mark::Done);
                order.push(name);
                stack.pop();
            }
        }
    }
    Ok(order)
}

fn missing(name: &str) -> ImageError {
    ImageError::MissingModule {
        name: name.to_string(),
        dir: PathBuf::new(),
    }
}

/// Resolves `wanted` against the modules under `dir`: the load order and
/// each module's file.
pub(crate) fn resolve(dir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>, ImageError> {
    let files = index(dir)?;
    let order = load_order(wanted, |name| {
        let Some(path) = files.get(name) else {
            return Ok(None);
        };
        let data = std::fs::read(path)
            .map_err(ImageError::io(format!("cannot read {}", path.display())))?;
        let modinfo = elf_section(&data, ".modinfo").map_err(|reason| ImageError::BadModule {
            path: path.clone(),
            reason,
        })?;
        Ok(Some(depends(modinfo)))
    })
    .map_err(|e| match e {
        ImageError::MissingModule { name, .. } => ImageError::MissingModule {
            name,
            dir: dir.to_path_buf(),
        },
        e => e,
    })?;
    Ok(order
        .into_iter()
        .filter_map(|name| {
            let path = files.get(&name)?.clone();
            Some((name, path))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_depends() {
        let info =
            b"license=GPL\0depends=virtio_ring,virtio\0retpoline=Y\0intree=Y\0name=virtio_mmio\0";
        assert_eq!(depends(info), ["virtio_ring", "virtio"]);
        assert!(depends(b"depends=\0name=virtio\0").is_empty());
        assert!(depends(b"name=x\0").is_empty());
        assert_eq!(modinfo_values(info, "name"), ["virtio_mmio"]);
        // A key that merely ends in "depends" is not it.
        assert!(depends(b"softdepends=foo\0").is_empty());
        assert_eq!(depends(b"depends=nf-conntrack\0"), ["nf_conntrack"]);
    }

    fn graph(
        edges: &[(&str, &[&str])],
    ) -> impl FnMut(&str) -> Result<Option<Vec<String>>, ImageError> {
        let map: HashMap<String, Vec<String>> = edges
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect();
        move |name| Ok(map.get(name).cloned())
    }

    #[test]
    fn orders_dependencies_first() {
        let g = graph(&[
            ("virtio", &[]),
            ("virtio_ring", &["virtio"]),
            ("virtio_mmio", &["virtio_ring", "virtio"]),
            ("virtio_blk", &["virtio_ring", "virtio"]),
            ("failover", &[]),
            ("net_failover", &["failover"]),
            ("virtio_net", &["net_failover", "virtio_ring", "virtio"]),
            ("vsock", &[]),
            ("vmw_vsock_virtio_transport_common", &["vsock"]),
            (
                "vmw_vsock_virtio_transport",
                &[
                    "vmw_vsock_virtio_transport_common",
                    "virtio_ring",
                    "virtio",
                    "vsock",
                ],
            ),
            ("fuse", &[]),
            ("virtiofs", &["fuse", "virtio_ring", "virtio"]),
            ("overlay", &[]),
        ]);
        let order = load_order(
            &[
                "virtio_mmio",
                "virtio_blk",
                "virtio_net",
                "vmw_vsock_virtio_transport",
                "fuse",
                "virtiofs",
                "overlay",
            ],
            g,
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "virtio",
                "virtio_ring",
                "virtio_mmio",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "fuse",
                "virtiofs",
                "overlay"
            ]
        );
    }

    #[test]
    fn missing_and_cyclic_modules_are_errors() {
        let err = load_order(&["a"], graph(&[("a", &["b"])])).unwrap_err();
        assert!(
            matches!(err, ImageError::MissingModule { ref name, .. } if name == "b"),
            "{err}"
        );
        let err = load_order(&["a"], graph(&[("a", &["b"]), ("b", &["a"])])).unwrap_err();
        assert!(matches!(err, ImageError::ModuleCycle(_)), "{err}");
        // Diamonds are fine and each module appears once.
        let order = load_order(
            &["a", "d"],
            graph(&[("a", &["b", "c"]), ("b", &["d"]), ("c", &["d"]), ("d", &[])]),
        )
        .unwrap();
        assert_eq!(order, ["d", "b", "c", "a"]);
    }

    #[test]
    fn reads_modinfo_from_a_real_elf_object() {
        // Build a tiny relocatable object with a .modinfo section (gcc is on
        // every machine that builds smolvm: -sys crates need it).
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.c");
        std::fs::write(
            &src,
            "__attribute__((section(\".modinfo\"), used)) static const char a[] = \"depends=virtio_ring,virtio\";\n\
             __attribute__((section(\".modinfo\"), used)) static const char b[] = \"name=virtio_mmio\";\n",
        )
        .unwrap();
        let obj = dir.path().join("virtio_mmio.ko");
        let ok = std::process::Command::new("cc")
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cc could not compile a test object");
        let data = std::fs::read(&obj).unwrap();
        let info = elf_section(&data, ".modinfo").unwrap();
        assert_eq!(depends(info), ["virtio_ring", "virtio"]);
        assert!(elf_section(&data, ".nope").is_err());
        assert!(elf_section(b"not an elf", ".modinfo").is_err());
        let idx = index(dir.path()).unwrap();
        assert_eq!(idx.get("virtio_mmio"), Some(&obj));
    }
}
