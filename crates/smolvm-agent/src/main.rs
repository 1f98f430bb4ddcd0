//! smolvm-agent: PID 1 of a smolvm guest, serving the smolvm protocol on the
//! `smolvm.agent` virtio-serial port. With `--stdio` (not as PID 1) it serves
//! the protocol on stdin/stdout instead, for tests on the host.

// Tests may cast freely (small, known values); the code itself may not.
#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::cast_sign_loss
    )
)]

#[macro_use]
mod log;
mod channel;
mod cmdline;
mod exec;
mod files;
mod identity;
mod init;
mod net;
mod procs;
mod reaper;
mod server;
mod shutdown;
mod ssh;
mod streams;
mod sys;
mod tunnel;
mod writer;

use server::Mode;
use std::fs::File;
use std::time::Duration;

/// How long to wait for the virtio port to show up.
const PORT_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let start_ms = sys::boottime_ms();
    if std::process::id() == 1 {
        guest_main(start_ms);
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.len() == 1 && args[0] == "--stdio" {
        stdio_main(start_ms);
    }
    eprintln!("usage: smolvm-agent --stdio\n\nsmolvm's guest agent runs as PID 1 in a smolvm guest; --stdio serves the protocol on stdin/stdout for tests.");
    std::process::exit(2);
}

fn guest_main(start_ms: u64) -> ! {
    log::use_kmsg();
    // The release build aborts on panic, which as PID 1 panics the kernel:
    // at least say why first.
    std::panic::set_hook(Box::new(|info| error!("panic: {info}")));
    info!("starting v{} at {start_ms} ms", env!("CARGO_PKG_VERSION"));
    init::setup();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cfg = cmdline::BootConfig::parse(&cmdline);
    for bad in &cfg.invalid {
        error!("ignoring kernel parameter {bad}");
    }
    if let Some(id) = &cfg.id {
        init::boot_hostname(id);
    }
    net::configure(&cfg);
    if cfg.grow_root {
        // Before the reaper starts: waiting on our own child is safe here.
        init::grow_root();
    }
    if let Err(e) = reaper::start() {
        server::fatal(Mode::Guest, &format!("cannot start the reaper: {e}"));
    }
    let (port, path) = match channel::open_agent_port(PORT_TIMEOUT) {
        Ok(p) => p,
        Err(e) => server::fatal(Mode::Guest, &format!("open the agent port: {e}")),
    };
    let writer = match port.try_clone() {
        Ok(w) => w,
        Err(e) => server::fatal(Mode::Guest, &format!("dup {}: {e}", path.display())),
    };
    info!("channel {}", path.display());
    server::serve(port, writer, Mode::Guest, start_ms)
}

fn stdio_main(start_ms: u64) -> ! {
    // Take the protocol fds private and put /dev/null on 0 and 1, so nothing
    // (a stray print, a child) can ever write into the protocol stream.
    let (input, output) = match (sys::dup_cloexec(0), sys::dup_cloexec(1)) {
        (Ok(i), Ok(o)) => (File::from(i), File::from(o)),
        (Err(e), _) | (_, Err(e)) => server::fatal(Mode::Stdio, &format!("dup stdin/stdout: {e}")),
    };
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fds 0 and 1, which we no longer use directly.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
    // Orphans of our execs come back to us, as they would to PID 1.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes plain integers.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if let Err(e) = reaper::start() {
        server::fatal(Mode::Stdio, &format!("cannot start the reaper: {e}"));
    }
    server::serve(input, output, Mode::Stdio, start_ms)
}
