//! Ending the guest: stop every process, make the disk consistent, and
//! restart the machine. The host runs QEMU with `-no-reboot` and the kernel
//! with `reboot=t`, so a restart makes QEMU exit (power-off is not reliable
//! on microvm).

use crate::sys::{kill, sync};
use std::time::Duration;

/// Terminates all processes, syncs, remounts / read-only and restarts.
/// Never returns.
pub fn power_off(reason: &str) -> ! {
    info!("shutting down: {reason}");
    let _ = kill(-1, libc::SIGTERM);
    if !crate::reaper::wait_idle(Duration::from_secs(2)) {
        let _ = kill(-1, libc::SIGKILL);
        crate::reaper::wait_idle(Duration::from_secs(1));
    }
    sync();
    // SAFETY: valid C string path; NULL source/fstype/data are allowed for a remount.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if r != 0 {
        error!("remount / read-only: {}", std::io::Error::last_os_error());
    }
    sync();
    // SAFETY: reboot has no memory-safety preconditions; as PID 1 with
    // CAP_SYS_BOOT it does not return on success.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_RESTART) };
    error!("reboot: {}", std::io::Error::last_os_error());
    // PID 1 must never exit (the kernel would panic): park forever.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
