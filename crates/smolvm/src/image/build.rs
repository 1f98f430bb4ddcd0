//! Building, caching, listing and removing images.
//!
//! An image is rebuilt in parts: the kernel (vmlinux + modules) and the
//! rootfs are reused from the cached image while their recipe hashes match;
//! the initramfs is rebuilt alone when only the agent or `/init` changed.
//! Full builds happen in a scratch directory and are swapped into place
//! whole; initramfs refreshes replace one file and then the manifest, each
//! by rename.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::initramfs::{self, InitramfsInputs};
use super::manifest::{
    now, sha256_file, FileEntry, Files, InitramfsInfo, KernelInfo, Manifest, RootfsInfo, INITRAMFS,
    MANIFEST_FORMAT, MODULES_DIR, ROOTFS, VMLINUX,
};
use super::recipe::{self, sha256_hex, Recipe, INIT_SH};
use super::rootfs::{self, STEP_PREFIX};
use super::store::{self, ImageLock, ScratchDir};
use super::types::{BuildOptions, BuildOutcome, Image, ImageEvent};
use super::{kernel, ImageError};
use crate::{hosttools, locate, paths};

const SMOLVM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How closely cached files are checked against the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Exists with the recorded size (cheap; used on every `ensure`).
    Sizes,
    /// Also re-hashes every file (an explicit `build`).
    Hashes,
}

/// Which cached parts of an image are still good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Validity {
    kernel: bool,
    rootfs: bool,
    initramfs: bool,
}

fn validate(
    recipe: &Recipe,
    dir: &Path,
    m: &Manifest,
    want: &InitramfsInfo,
    check: Check,
) -> Validity {
    let file_ok = |entry: &FileEntry, name: &str| match check {
        Check::Sizes => entry.size_matches(&dir.join(name)),
        Check::Hashes => entry.verify(&dir.join(name)),
    };
    let header = m.format == MANIFEST_FORMAT && m.name == recipe.name;
    let kernel = header
        && m.kernel.recipe_hash == recipe.kernel_hash()
        && file_ok(&m.files.vmlinux, VMLINUX)
        && m.module_files(dir).iter().all(|(_, p)| p.is_file());
    let rootfs =
        header && m.rootfs.recipe_hash == recipe.rootfs_hash() && file_ok(&m.files.rootfs, ROOTFS);
    let initramfs = header && &m.initramfs == want && file_ok(&m.files.initramfs, INITRAMFS);
    Validity {
        kernel,
        rootfs,
        initramfs,
    }
}

/// Sends events, numbering steps.
struct Reporter<'a> {
    sink: &'a mut dyn FnMut(ImageEvent),
    index: usize,
    total: usize,
}

impl Reporter<'_> {
    fn plan(&mut self, total: usize) {
        self.index = 0;
        self.total = total;
    }

    fn step(&mut self, label: impl Into<String>) {
        self.index += 1;
        let label = label.into();
        tracing::debug!(step = self.index, total = self.total, "{label}");
        (self.sink)(ImageEvent::Step {
            index: self.index,
            total: self.total.max(self.index),
            label,
        });
    }

    fn log(&mut self, line: impl Into<String>) {
        (self.sink)(ImageEvent::Log(line.into()));
    }

    /// A tool's output line; the rootfs hook's own lines mark steps.
    fn tool_line(&mut self, line: &str) {
        match line.strip_prefix(STEP_PREFIX) {
            Some(step) => self.step(step),
            None => self.log(line),
        }
    }
}

/// The initramfs inputs on this host and what the manifest should say
/// about them.
fn initramfs_wanted(
    modules: Vec<(String, PathBuf)>,
) -> Result<(InitramfsInputs, InitramfsInfo), ImageError> {
    let inputs = InitramfsInputs::locate(modules)?;
    let info = InitramfsInfo {
        agent_sha256: sha256_file(&inputs.agent)?.1,
        init_sha256: sha256_hex(INIT_SH.as_bytes()),
        busybox_sha256: sha256_file(&inputs.busybox)?.1,
    };
    Ok((inputs, info))
}

/// Returns image `name`, building it (or just its initramfs, when only the
/// agent or `/init` changed) when the cache does not hold a current one.
/// The common case — image present and current — reads the manifest,
/// checks file sizes and hashes the agent, nothing more, and sends no
/// events.
pub fn ensure(name: &str, progress: &mut dyn FnMut(ImageEvent)) -> Result<Image, ImageError> {
    let recipe = recipe::get(name)?;
    let dir = paths::images_dir().join(name);
    let agent = locate::agent_binary()?;
    if let Ok(m) = Manifest::load(&dir) {
        let (_, agent_sha) = sha256_file(&agent)?;
        let want = InitramfsInfo {
            agent_sha256: agent_sha,
            init_sha256: sha256_hex(INIT_SH.as_bytes()),
            // busybox changes alone do not force a refresh.
            busybox_sha256: m.initramfs.busybox_sha256.clone(),
        };
        let v = validate(recipe, &dir, &m, &want, Check::Sizes);
        if v.kernel && v.rootfs && v.initramfs {
            return Ok(Image::new(dir, m));
        }
    }
    build_image(recipe, false, Check::Sizes, progress)
}

/// Builds image `name`. Without `force`, cached parts that are still
/// current are verified (re-hashed) and reused, so a repeated build takes
/// seconds.
pub fn build(
    name: &str,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(ImageEvent),
) -> Result<Image, ImageError> {
    let recipe = recipe::get(name)?;
    build_image(recipe, opts.force, Check::Hashes, progress)
}

fn build_image(
    recipe: &Recipe,
    force: bool,
    check: Check,
    progress: &mut dyn FnMut(ImageEvent),
) -> Result<Image, ImageError> {
    let started = Instant::now();
    let mut rep = Reporter {
        sink: progress,
        index: 0,
        total: 0,
    };
    let name = recipe.name;
    let images = paths::images_dir();
    crate::private::dir_all(&images).map_err(ImageError::io(format!(
        "cannot create {}",
        images.display()
    )))?;
    let _ = crate::private::tighten(&paths::cache_dir(), crate::private::DIR_MODE);
    let _lock = ImageLock::acquire(&images, name, &mut || {
        rep.log(format!(
            "waiting for another smolvm process to finish building `{name}`"
        ));
    })?;
    store::clean_stale(&images, name);
    let dir = images.join(name);

    let existing = if force {
        None
    } else {
        Manifest::load(&dir).ok()
    };
    let (mut inputs, want) = initramfs_wanted(Vec::new())?;
    let validity = match &existing {
        Some(m) => {
            if check == Check::Hashes {
                rep.plan(1);
                rep.step("verifying cached image");
            }
            validate(recipe, &dir, m, &want, check)
        }
        None => Validity {
            kernel: false,
            rootfs: false,
            initramfs: false,
        },
    };

    let (manifest, outcome) = match existing {
        Some(m) if validity.kernel && validity.rootfs && validity.initramfs => {
            (m, BuildOutcome::UpToDate)
        }
        Some(mut m) if validity.kernel && validity.rootfs => {
            rep.plan(1);
            rep.step("building initramfs");
            inputs.modules = m.module_files(&dir);
            refresh_initramfs(&dir, &mut m, &inputs, want)?;
            (m, BuildOutcome::Initramfs)
        }
        existing => {
            let reuse = existing.filter(|_| validity.kernel || validity.rootfs);
            let m = full_build(
                recipe,
                &images,
                reuse.as_ref(),
                validity,
                inputs,
                want,
                &mut rep,
            )?;
            (m, BuildOutcome::Built)
        }
    };
    let elapsed = started.elapsed();
    tracing::info!(image = name, ?outcome, ?elapsed, "image ready");
    (rep.sink)(ImageEvent::Done { elapsed, outcome });
    Ok(Image::new(dir, manifest))
}

/// Rewrites the initramfs of a cached image and updates its manifest.
fn refresh_initramfs(
    dir: &Path,
    m: &mut Manifest,
    inputs: &InitramfsInputs,
    want: InitramfsInfo,
) -> Result<(), ImageError> {
    let tmp = dir.join(format!("{INITRAMFS}.tmp-{}", std::process::id()));
    let dest = dir.join(INITRAMFS);
    let result = (|| -> Result<FileEntry, ImageError> {
        initramfs::write(&tmp, inputs)?;
        let entry = FileEntry::of(&tmp)?;
        std::fs::rename(&tmp, &dest)
            .map_err(ImageError::io(format!("cannot replace {}", dest.display())))?;
        Ok(entry)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    m.files.initramfs = result?;
    m.initramfs = want;
    m.updated_at = now();
    m.smolvm_version = SMOLVM_VERSION.to_string();
    m.save(dir)
}

/// Builds a complete image in a scratch directory (reusing the cached
/// kernel and/or rootfs where `validity` allows) and swaps it into place.
fn full_build(
    recipe: &Recipe,
    images: &Path,
    cached: Option<&Manifest>,
    validity: Validity,
    mut inputs: InitramfsInputs,
    want: InitramfsInfo,
    rep: &mut Reporter<'_>,
) -> Result<Manifest, ImageError> {
    let dir = images.join(recipe.name);
    let reuse_kernel = cached.filter(|_| validity.kernel);
    let reuse_rootfs = cached.filter(|_| validity.rootfs);
    // Everything this build runs, checked before any work starts.
    if reuse_kernel.is_none() || reuse_rootfs.is_none() {
        hosttools::require("mmdebstrap")?;
    }
    if reuse_kernel.is_none() {
        hosttools::require("lz4")?;
    }
    if reuse_rootfs.is_none() {
        hosttools::require("mkfs.ext4")?;
        hosttools::require("unshare")?;
    }
    let total =
        2 + if reuse_kernel.is_none() { 2 } else { 0 } + if reuse_rootfs.is_none() { 2 } else { 0 };
    rep.plan(total);

    let scratch = ScratchDir::create(images, recipe.name)?;
    let stage = scratch.path().join("image");
    let work = scratch.path().join("work");
    let modules_dir = stage.join(MODULES_DIR);
    for d in [&modules_dir, &work] {
        std::fs::create_dir_all(d)
            .map_err(ImageError::io(format!("cannot create {}", d.display())))?;
    }

    let (kernel_info, vmlinux_entry) = match reuse_kernel {
        Some(m) => {
            rep.log(format!("kernel {} unchanged; reusing it", m.kernel.version));
            store::link_or_copy(&dir.join(VMLINUX), &stage.join(VMLINUX))?;
            for (name, path) in m.module_files(&dir) {
                store::link_or_copy(&path, &modules_dir.join(format!("{name}.ko")))?;
            }
            (m.kernel.clone(), m.files.vmlinux.clone())
        }
        None => {
            rep.step("fetching kernel (mmdebstrap)");
            let fetched = kernel::fetch(recipe, &work, &mut |l| rep.log(l))?;
            rep.step(format!("extracting vmlinux {}", fetched.version));
            let elf = kernel::extract_vmlinux(&fetched.bzimage)?;
            let vmlinux = stage.join(VMLINUX);
            write_file(&vmlinux, &elf)?;
            for (name, path) in &fetched.modules {
                let dest = modules_dir.join(format!("{name}.ko"));
                std::fs::copy(path, &dest)
                    .map_err(ImageError::io(format!("cannot copy {}", path.display())))?;
            }
            store::remove_tree(&work.join("kernel-tree"));
            let info = KernelInfo {
                package: recipe.kernel_package.to_string(),
                version: fetched.version,
                modules: fetched.modules.into_iter().map(|(n, _)| n).collect(),
                recipe_hash: recipe.kernel_hash(),
            };
            rep.log(format!("modules: {}", info.modules.join(" ")));
            (info, FileEntry::of(&vmlinux)?)
        }
    };

    let (rootfs_info, rootfs_entry) = match reuse_rootfs {
        Some(m) => {
            rep.log("root filesystem unchanged; reusing it");
            store::link_or_copy(&dir.join(ROOTFS), &stage.join(ROOTFS))?;
            (m.rootfs.clone(), m.files.rootfs.clone())
        }
        None => {
            rep.step("building rootfs (mmdebstrap)");
            let ext4 = stage.join(ROOTFS);
            let built = rootfs::build(recipe, &ext4, &work, &mut |l| rep.tool_line(l))?;
            let info = RootfsInfo {
                suite: recipe.suite.to_string(),
                packages: recipe.packages.iter().map(|p| p.to_string()).collect(),
                installed: built.installed,
                recipe_hash: recipe.rootfs_hash(),
            };
            (info, FileEntry::of(&ext4)?)
        }
    };

    rep.step("building initramfs");
    inputs.modules = kernel_info
        .modules
        .iter()
        .map(|n| (n.clone(), modules_dir.join(format!("{n}.ko"))))
        .collect();
    let initramfs_path = stage.join(INITRAMFS);
    initramfs::write(&initramfs_path, &inputs)?;

    rep.step("writing manifest");
    let created = now();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: recipe.name.to_string(),
        created_at: created,
        updated_at: created,
        smolvm_version: SMOLVM_VERSION.to_string(),
        recipe_hash: recipe.hash(),
        kernel: kernel_info,
        rootfs: rootfs_info,
        initramfs: want,
        files: Files {
            vmlinux: vmlinux_entry,
            initramfs: FileEntry::of(&initramfs_path)?,
            rootfs: rootfs_entry,
        },
    };
    manifest.save(&stage)?;
    store::install(&stage, &dir)?;
    // `scratch` (now holding any previous image) is removed on drop.
    drop(scratch);
    Ok(manifest)
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    use std::io::Write;
    let err = || ImageError::io(format!("cannot write {}", path.display()));
    let mut f = std::fs::File::create(path).map_err(err())?;
    f.write_all(data).map_err(err())?;
    f.sync_all().map_err(err())
}
