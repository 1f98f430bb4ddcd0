//! The two fields of a qcow2 header smolvm reads: the virtual size and
//! the backing file name (so disk chains are known from the files
//! themselves, without running `qemu-img`).

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Longest backing name read (QEMU's own limit is 1023).
const MAX_BACKING: u32 = 1023;

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub virtual_size: u64,
    /// The backing file name exactly as stored (relative names are
    /// relative to the image's directory).
    pub backing: Option<String>,
    backing_offset: u64,
    backing_len: u32,
}

fn bad(path: &Path, what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{} is not a usable qcow2 image: {what}", path.display()),
    )
}

/// Reads the header of the qcow2 image at `path`.
pub fn header(path: &Path) -> std::io::Result<Header> {
    let mut f = std::fs::File::open(path)?;
    let mut h = [0u8; 32];
    f.read_exact(&mut h)
        .map_err(|_| bad(path, "short header"))?;
    if &h[0..4] != MAGIC {
        return Err(bad(path, "no qcow2 magic"));
    }
    let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
    let backing_offset = be64(&h[8..16]);
    let backing_len = u32::from_be_bytes(h[16..20].try_into().unwrap_or([0; 4]));
    let virtual_size = be64(&h[24..32]);
    let backing = if backing_offset == 0 || backing_len == 0 {
        None
    } else {
        if backing_len > MAX_BACKING {
            return Err(bad(path, "backing file name too long"));
        }
        let mut name = vec![0u8; backing_len as usize];
        f.seek(SeekFrom::Start(backing_offset))?;
        f.read_exact(&mut name)
            .map_err(|_| bad(path, "truncated backing file name"))?;
        Some(String::from_utf8(name).map_err(|_| bad(path, "backing file name is not UTF-8"))?)
    };
    Ok(Header {
        virtual_size,
        backing,
        backing_offset,
        backing_len,
    })
}

/// The backing file of `image`, resolved against the image's directory.
pub fn backing_path(image: &Path) -> std::io::Result<Option<PathBuf>> {
    Ok(header(image)?.backing.map(|b| {
        let b = PathBuf::from(b);
        if b.is_absolute() {
            b
        } else {
            image.parent().map_or(b.clone(), |d| d.join(&b))
        }
    }))
}

/// Longest backing chain followed.
pub const MAX_CHAIN: usize = 4096;

/// Every file in `image`'s backing chain (not `image` itself), nearest
/// first; stops at a file that is not qcow2 (the raw base) or is missing.
pub fn chain(image: &Path) -> Vec<PathBuf> {
    chain_checked(image).0
}

/// [`chain`], and whether it is known whole: false when it was cut short
/// (too long, or a layer that exists but cannot be read), so that nothing
/// below it may be taken for unused.
pub fn chain_checked(image: &Path) -> (Vec<PathBuf>, bool) {
    let mut out = Vec::new();
    let mut cur = image.to_path_buf();
    loop {
        if out.len() >= MAX_CHAIN {
            return (out, false);
        }
        match backing_path(&cur) {
            Ok(Some(b)) => {
                out.push(b.clone());
                cur = b;
            }
            Ok(None) => return (out, true),
            // The raw base is not qcow2; a missing file ends the chain.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let raw = std::fs::File::open(&cur)
                    .and_then(|mut f| {
                        let mut m = [0u8; 4];
                        std::io::Read::read_exact(&mut f, &mut m).map(|()| m)
                    })
                    .is_ok_and(|m| &m != MAGIC);
                return (out, raw);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (out, true),
            Err(_) => return (out, false),
        }
    }
}

/// Rewrites the backing file name of a closed image in place to `name`,
/// which must be no longer than the current one (it is written where the
/// current one is). Used to make an older VM's absolute backing path
/// relative before a boot.
pub fn set_backing_in_place(path: &Path, name: &str) -> std::io::Result<()> {
    let h = header(path)?;
    if h.backing.is_none() || name.len() > h.backing_len as usize || name.is_empty() {
        return Err(bad(path, "the new backing name does not fit"));
    }
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(h.backing_offset))?;
    f.write_all(name.as_bytes())?;
    f.seek(SeekFrom::Start(16))?;
    f.write_all(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, backing: &str, size: u64) -> PathBuf {
        let p = dir.join("d.qcow2");
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(MAGIC);
        h[7] = 3;
        h[8..16].copy_from_slice(&200u64.to_be_bytes());
        h[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[200..200 + backing.len()].copy_from_slice(backing.as_bytes());
        std::fs::write(&p, h).unwrap();
        p
    }

    #[test]
    fn reads_and_rewrites_the_backing_name() {
        let d = tempfile::tempdir().unwrap();
        let p = image(d.path(), "/old/vms/x/base.ext4", 1 << 30);
        let h = header(&p).unwrap();
        assert_eq!(h.virtual_size, 1 << 30);
        assert_eq!(h.backing.as_deref(), Some("/old/vms/x/base.ext4"));
        set_backing_in_place(&p, "base.ext4").unwrap();
        assert_eq!(header(&p).unwrap().backing.as_deref(), Some("base.ext4"));
        assert_eq!(backing_path(&p).unwrap(), Some(d.path().join("base.ext4")));
        assert!(set_backing_in_place(&p, "a-name-longer-than-before").is_err());
        std::fs::write(d.path().join("x"), b"not qcow2").unwrap();
        assert!(header(&d.path().join("x")).is_err());
    }
}
