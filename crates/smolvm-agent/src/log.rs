//! Log lines prefixed `smolvm-agent:`, to `/dev/kmsg` as PID 1 (so they land
//! in the guest's kernel log and on the console), else to stderr.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A kmsg record is at most ~1 KiB; longer lines are cut.
const MAX_LINE: usize = 900;

static KMSG: OnceLock<Mutex<File>> = OnceLock::new();

#[derive(Clone, Copy)]
pub enum Level {
    Info,
    Error,
}

/// Sends all further log lines to `/dev/kmsg` (falls back to stderr when it
/// cannot be opened).
pub fn use_kmsg() {
    if let Ok(f) = OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = KMSG.set(Mutex::new(f));
    }
}

pub fn write(level: Level, args: fmt::Arguments<'_>) {
    let mut line = format!("smolvm-agent: {args}").replace('\n', " ");
    if line.len() > MAX_LINE {
        let mut cut = MAX_LINE;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    match KMSG.get() {
        Some(kmsg) => {
            let prio = match level {
                Level::Info => 6,
                Level::Error => 3,
            };
            let mut f = kmsg.lock().unwrap_or_else(|e| e.into_inner());
            let _ = f.write_all(format!("<{prio}>{line}\n").as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// Lets a repeating error through at most once per `every`.
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when this occurrence should be logged; `n` is how many were
    /// suppressed since the last logged one.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

macro_rules! info {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($t)*)) };
}

macro_rules! error {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($t)*)) };
}

#[cfg(test)]
mod tests {
    use super::RateLimit;
    use std::time::Duration;

    #[test]
    fn rate_limit_counts_suppressed() {
        let mut r = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        let mut r2 = RateLimit::new(Duration::ZERO);
        assert_eq!(r2.allow(), Some(0));
        assert_eq!(r2.allow(), Some(0));
    }
}
