//! Listing and removing cached images.

use super::manifest::{Manifest, MANIFEST_FORMAT};
use super::recipe;
use super::store::{self, ImageLock};
use super::types::ImageInfo;
use super::ImageError;
use crate::paths;

fn check_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidName(name.to_string()))
    }
}

/// The images in the cache, by name.
pub fn list() -> Result<Vec<ImageInfo>, ImageError> {
    let images = paths::images_dir();
    let entries = match std::fs::read_dir(&images) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ImageError::io(format!("cannot read {}", images.display()))(
                e,
            ))
        }
    };
    let mut out = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        let dir = entry.path();
        let mut info = ImageInfo {
            name: name.clone(),
            size_on_disk: store::disk_usage(&dir),
            dir: dir.clone(),
            created_at: 0,
            kernel_version: String::new(),
            agent_sha256_short: String::new(),
            problem: None,
        };
        match Manifest::load(&dir) {
            Ok(m) => {
                info.created_at = m.created_at;
                info.kernel_version = m.kernel.version.clone();
                info.agent_sha256_short = m.initramfs.agent_sha256.chars().take(12).collect();
                info.problem = match recipe::get(&name) {
                    Err(_) => Some("no recipe for this image in this smolvm version".into()),
                    Ok(r) if m.format != MANIFEST_FORMAT || m.recipe_hash != r.hash() => {
                        Some(format!("outdated; run `smolvm image build {name}`"))
                    }
                    Ok(_) => None,
                };
            }
            Err(e) => info.problem = Some(e.to_string()),
        }
        out.push(info);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Deletes image `name` from the cache (waiting for a build of it to end).
pub fn remove(name: &str) -> Result<(), ImageError> {
    check_name(name)?;
    let images = paths::images_dir();
    let dir = images.join(name);
    if !dir.is_dir() {
        return Err(ImageError::NotBuilt {
            name: name.to_string(),
        });
    }
    let _lock = ImageLock::acquire(&images, name, &mut || {})?;
    if !dir.is_dir() {
        return Err(ImageError::NotBuilt {
            name: name.to_string(),
        });
    }
    // Rename first so the image disappears at once, then delete.
    let doomed = images.join(format!(".tmp-{}-{name}", std::process::id()));
    store::remove_tree(&doomed);
    std::fs::rename(&dir, &doomed)
        .map_err(ImageError::io(format!("cannot remove {}", dir.display())))?;
    store::remove_tree(&doomed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", ".hidden", "a/b", "..", "x y"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("debian-12").unwrap();
        check_name("my_image.v2").unwrap();
    }
}
