//! `smolvm cp`: files and directories between the host and a sandbox.

use smolvm::Sandbox;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct CpArgs {
    /// What to copy: a local path, or ID:/guest/path.
    src: String,
    /// Where to: ID:/guest/path, or a local path. An existing directory
    /// receives SRC under its own name. Directories are copied whole.
    dst: String,
    /// Refuse a guest file, or a directory whose files add up to more,
    /// larger than this many bytes (downloads).
    #[arg(long, value_name = "BYTES")]
    max_bytes: Option<u64>,
    /// Print nothing on success.
    #[arg(short, long)]
    quiet: bool,
}

/// `ID:/path` when the part before the first `:` is a valid sandbox name.
fn guest_spec(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    smolvm::config::validate_name(id).ok()?;
    Some((id, path))
}

/// A guest path must be absolute; a relative one may be a local file
/// with a `:` in its name.
fn check_spec(spec: &str, path: &str) -> anyhow::Result<()> {
    if !path.starts_with('/') {
        anyhow::bail!(
            "{spec:?}: the guest path must be absolute (e.g. {}:/root/{}); a local file whose name has a ':' is written ./{spec}",
            spec.split(':').next().unwrap_or(""),
            path.trim_start_matches("./").trim_start_matches("~/")
        );
    }
    Ok(())
}

/// The last component of a guest path, refused when it is not a name
/// (`/`, `.`, `..`): the destination must then be named.
fn guest_basename(p: &str) -> anyhow::Result<&str> {
    let b = basename(p);
    if b.is_empty() || b == "." || b == ".." {
        anyhow::bail!("{p:?} has no name to copy under; name the destination (e.g. ./out)");
    }
    Ok(b)
}

fn basename(p: &str) -> &str {
    p.trim_end_matches('/').rsplit('/').next().unwrap_or(p)
}

/// "3 files, 2 directories, 1 symlink" (and the special files skipped).
fn tree_summary(s: &smolvm::sandbox::TreeSummary) -> String {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut out = format!(
        "{}, {}, {}",
        plural(s.files, "file", "files"),
        plural(s.dirs, "directory", "directories"),
        plural(s.symlinks, "symlink", "symlinks")
    );
    if s.skipped > 0 {
        out.push_str(&format!(", {} special files skipped", s.skipped));
    }
    out
}

pub async fn cp(a: CpArgs) -> anyhow::Result<u8> {
    let t = Instant::now();
    let (summary, bytes) = match (guest_spec(&a.src), guest_spec(&a.dst)) {
        (Some(_), Some(_)) => anyhow::bail!(
            "both paths are in sandboxes; copy through the host (smolvm cp ID:/a LOCAL, then smolvm cp LOCAL ID2:/b)"
        ),
        (None, None) => anyhow::bail!(
            "neither path names a sandbox; write the guest side as ID:/path (e.g. smolvm cp ./file sbx-1234abcd:/root/)"
        ),
        (None, Some((id, gpath))) => {
            check_spec(&a.dst, gpath)?;
            let sbx = Sandbox::from_id(id).await?;
            let local = PathBuf::from(&a.src);
            let md = std::fs::symlink_metadata(&local)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", local.display()))?;
            let name = local
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Into an existing guest directory: under the source's name.
            let mut dest = gpath.to_string();
            if gpath.starts_with('/')
                && (gpath.ends_with('/') || sbx.stat(gpath, true).await.is_ok_and(|s| s.kind == smolvm::sandbox::FileKind::Dir))
                && !name.is_empty()
            {
                dest = format!("{}/{name}", gpath.trim_end_matches('/'));
            }
            if md.is_dir() {
                let s = sbx.upload_dir(&local, &dest).await?;
                (tree_summary(&s), s.bytes)
            } else {
                let n = sbx.upload_file(&local, &dest, false).await?;
                (format!("1 file to {id}:{dest}"), n)
            }
        }
        (Some((id, gpath)), None) => {
            check_spec(&a.src, gpath)?;
            let sbx = Sandbox::from_id(id).await?;
            let st = sbx.stat(gpath, true).await?;
            let mut local = PathBuf::from(&a.dst);
            if Path::new(&a.dst).is_dir() {
                local = local.join(guest_basename(gpath)?);
            } else if a.dst.ends_with('/') {
                anyhow::bail!("{} is not a directory (create it first, or drop the trailing /)", a.dst);
            }
            if st.kind == smolvm::sandbox::FileKind::Dir {
                let s = sbx.download_dir_limited(gpath, &local, a.max_bytes).await?;
                (tree_summary(&s), s.bytes)
            } else {
                let n = sbx.download_file(gpath, &local, false, a.max_bytes).await?;
                (format!("1 file to {}", local.display()), n)
            }
        }
    };
    if !a.quiet {
        let secs = t.elapsed().as_secs_f64();
        #[allow(clippy::cast_precision_loss)] // a rate to print
        let mib = bytes as f64 / (1024.0 * 1024.0);
        eprintln!(
            "copied {summary}: {mib:.1} MiB in {secs:.2} s ({:.0} MiB/s)",
            mib / secs.max(1e-9)
        );
    }
    Ok(0)
}
