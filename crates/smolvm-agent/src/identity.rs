//! `Reinit`: a restored or forked machine becomes a machine of its own: a
//! new hostname, fresh entropy in the kernel's pool, the host's time.
//!
//! Every step is best effort: one that fails (not permitted outside a real
//! guest, an old kernel) is logged and reported, never fatal.

use crate::sys::{cvt, os_message};
use smolvm_proto::Identity;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The most entropy bytes taken from one `Reinit` (more are cut off).
pub const MAX_ENTROPY: usize = 512;

/// Longest hostname set (a DNS label).
const MAX_HOSTNAME: usize = 63;

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` and `RNDRESEEDCRNG` =
/// `_IO('R', 0x07)` from `<linux/random.h>`, in the generic ioctl encoding
/// (x86, arm, riscv: the architectures smolvm guests run on).
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

/// `struct rand_pool_info` with room for [`MAX_ENTROPY`] bytes.
#[repr(C)]
struct RandPoolInfo {
    /// Bits credited.
    entropy_count: libc::c_int,
    /// Bytes in `buf`.
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

/// What `apply` achieved, for `Reinited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub hostname_set: bool,
    pub reseeded: bool,
    pub clock_set: bool,
}

/// Applies `id` in order: hostname, entropy, clock.
pub fn apply(id: &Identity) -> Applied {
    let hostname_set = match check_hostname(&id.hostname) {
        Ok(()) => match crate::init::set_hostname(&id.hostname) {
            Ok(()) => true,
            Err(e) => {
                error!("reinit: sethostname {}: {}", id.hostname, os_message(&e));
                false
            }
        },
        Err(why) => {
            error!("reinit: not setting hostname {:?}: {why}", id.hostname);
            false
        }
    };
    let reseeded = reseed(&id.entropy);
    let clock_set = set_clock(id.unix_time_ns);
    Applied {
        hostname_set,
        reseeded,
        clock_set,
    }
}

/// A hostname we set: 1 to 63 characters of `A-Z a-z 0-9 -`.
pub fn check_hostname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_HOSTNAME {
        return Err("must be 1 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("only letters, digits, '-' and '_' are allowed (the VM naming rule)");
    }
    Ok(())
}

/// Mixes `entropy` (credited: it comes from the host's CSPRNG) into the
/// kernel's pool and reseeds the CRNG from it. True when both worked.
fn reseed(entropy: &[u8]) -> bool {
    if entropy.is_empty() {
        error!("reinit: the host sent no entropy; the pool is not reseeded");
        return false;
    }
    let bytes = if entropy.len() > MAX_ENTROPY {
        error!(
            "reinit: {} bytes of entropy; taking the first {MAX_ENTROPY}",
            entropy.len()
        );
        &entropy[..MAX_ENTROPY]
    } else {
        entropy
    };
    let r = File::open("/dev/urandom").and_then(|f| {
        add_entropy(&f, bytes)?;
        // SAFETY: RNDRESEEDCRNG takes no argument.
        cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) }).map(drop)
    });
    match r {
        Ok(()) => true,
        Err(e) => {
            error!("reinit: reseeding the kernel's pool: {}", os_message(&e));
            false
        }
    }
}

fn add_entropy(f: &File, bytes: &[u8]) -> io::Result<()> {
    let mut info = RandPoolInfo {
        entropy_count: 0,
        buf_size: 0,
        buf: [0; MAX_ENTROPY],
    };
    // At most MAX_ENTROPY (512) bytes: both counts fit a c_int.
    let len = bytes.len().min(MAX_ENTROPY);
    info.buf[..len].copy_from_slice(&bytes[..len]);
    info.buf_size = libc::c_int::try_from(len).unwrap_or(0);
    info.entropy_count = libc::c_int::try_from(len * 8).unwrap_or(0);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info: two ints, then
    // `buf_size` bytes, all inside `info`, which lives across the call.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, &raw const info) }).map(drop)
}

/// Sets CLOCK_REALTIME to `unix_time_ns` (0: not given). True when set.
fn set_clock(unix_time_ns: u64) -> bool {
    if unix_time_ns == 0 {
        info!("reinit: the host sent no time; the clock is left as is");
        return false;
    }
    let secs = unix_time_ns / 1_000_000_000;
    let nanos = unix_time_ns % 1_000_000_000;
    let (Ok(tv_sec), Ok(tv_nsec)) = (libc::time_t::try_from(secs), libc::c_long::try_from(nanos))
    else {
        error!("reinit: time {unix_time_ns} ns does not fit a timespec");
        return false;
    };
    let ts = libc::timespec { tv_sec, tv_nsec };
    // SAFETY: `ts` is a valid timespec for the duration of the call.
    match cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }) {
        Ok(_) => true,
        Err(e) => {
            error!("reinit: setting the clock: {}", os_message(&e));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for good in ["a", "sbx-1", "VM0", "my_vm", &"a".repeat(63)] {
            assert_eq!(check_hostname(good), Ok(()), "{good}");
        }
        for bad in ["", &"a".repeat(64), "a.b", "a b", "é", "a\0"] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_request_codes_are_linux_s() {
        // _IOW('R', 3, int[2]): dir write (1) << 30 | size 8 << 16 | 'R' << 8 | 3.
        assert_eq!(RNDADDENTROPY, (1 << 30) | (8 << 16) | (0x52 << 8) | 3);
        assert_eq!(RNDRESEEDCRNG, (0x52 << 8) | 7);
        assert_eq!(std::mem::size_of::<RandPoolInfo>(), 8 + MAX_ENTROPY);
    }

    #[test]
    fn nothing_to_apply_is_no_error() {
        assert!(!set_clock(0));
        assert!(!reseed(&[]));
    }
}
