//! A tiny harness for tests that share booted VMs (booting under TCG takes
//! seconds): named cases, a filter from argv, a per-case limit, the line
//! `test NAME ... ok (Xs)` per case and the plain closing line
//! `N passed, N failed`; and the checks on pids and processes the VM tests
//! share.
//!
//! `smolvm`'s tests include it as `mod common;`, `smolvm-cli`'s as
//! `#[path = "../../smolvm/tests/common/mod.rs"] mod common;`.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

#[macro_export]
macro_rules! check {
    ($cond:expr) => {
        if !$cond {
            return Err(format!("{}:{}: check failed: {}", file!(), line!(), stringify!($cond)));
        }
    };
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($fmt)*)));
        }
    };
}

#[macro_export]
macro_rules! check_eq {
    ($a:expr, $b:expr) => {
        // `match` keeps temporaries of the operands alive for the comparison.
        match (&$a, &$b) {
            (a, b) => {
                if a != b {
                    return Err(format!(
                        "{}:{}: {} != {}: {:?} vs {:?}",
                        file!(),
                        line!(),
                        stringify!($a),
                        stringify!($b),
                        a,
                        b
                    ));
                }
            }
        }
    };
}

/// A case: an async fn of the fixture the cases share (`()` for none).
pub type CaseFn<T> = for<'a> fn(&'a T) -> Pin<Box<dyn Future<Output = Result<(), String>> + 'a>>;

/// `cases![f, g]` names async fns of no arguments; `cases![T: f, g]` async
/// fns of a shared `&T`. Either is a list for [`run_cases`].
#[macro_export]
macro_rules! cases {
    ($($f:ident),* $(,)?) => {
        vec![$((stringify!($f), (|_| Box::pin($f())) as $crate::common::CaseFn<()>)),*]
    };
    ($t:ty: $($f:ident),* $(,)?) => {
        vec![$((stringify!($f), (|x| Box::pin($f(x))) as $crate::common::CaseFn<$t>)),*]
    };
}

/// Isolates the test run's state (the image cache stays shared).
pub fn isolated_data_dir(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir");
    std::env::set_var("SMOLVM_DATA_DIR", d.path());
    d
}

/// The runtime the cases run on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// libtest options that take a value as the next argument (which is then
/// no filter).
const VALUE_OPTIONS: &[&str] = &["--format", "--logfile", "--test-threads", "--color", "-Z"];

/// The name filters in argv (libtest's options and their values left out).
pub fn filter() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if VALUE_OPTIONS.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            out.push(a);
        }
    }
    out
}

/// Whether case `name` runs: every case without filters; with `--exact`
/// (as nextest runs one test) only a case named exactly like a filter,
/// else a case whose name contains one.
pub fn selected(name: &str, filters: &[String]) -> bool {
    let exact = std::env::args().any(|a| a == "--exact");
    filters.is_empty()
        || filters.iter().any(|f| {
            if exact {
                name == f
            } else {
                name.contains(f.as_str())
            }
        })
}

/// The names of `cases`, for [`list_if_asked`].
pub fn case_names<'n, T>(cases: &[(&'n str, CaseFn<T>)]) -> Vec<&'n str> {
    cases.iter().map(|(n, _)| *n).collect()
}

/// `BINARY --list [--format terse] [--ignored] [FILTER...]`, what cargo and
/// nextest ask a test binary: prints each selected case as `NAME: test`
/// (libtest's count line after them unless `--format terse`) and exits 0,
/// before anything is booted. `--ignored` lists none: no case is ignored.
/// Returns when argv has no `--list`. Call it first in `main`.
pub fn list_if_asked(names: &[&str]) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--list") {
        return;
    }
    let ignored = args.iter().any(|a| a == "--ignored");
    let terse = args
        .windows(2)
        .any(|w| w[0] == "--format" && w[1] == "terse")
        || args.iter().any(|a| a == "--format=terse");
    let filters = filter();
    let mut n = 0;
    if !ignored {
        for name in names.iter().filter(|name| selected(name, &filters)) {
            println!("{name}: test");
            n += 1;
        }
    }
    if !terse {
        println!();
        println!("{n} tests, 0 benchmarks");
    }
    std::process::exit(0);
}

/// Runs, in order, the `cases` that `filters` select, each on `fixture` and
/// failed when it runs past `limit`; `after_each` runs after each of them.
/// Prints `test NAME ... ok (Xs)`, or `... FAILED (Xs)` and why; returns how
/// many passed and the names of those that failed.
pub async fn run_cases<T, A: Future<Output = ()>>(
    cases: &[(&str, CaseFn<T>)],
    fixture: &T,
    filters: &[String],
    limit: Option<Duration>,
    mut after_each: impl FnMut() -> A,
) -> (usize, Vec<String>) {
    let mut passed = 0;
    let mut failed = Vec::new();
    for (name, f) in cases {
        if !selected(name, filters) {
            continue;
        }
        let t = Instant::now();
        let r = match limit {
            None => f(fixture).await,
            Some(limit) => match tokio::time::timeout(limit, f(fixture)).await {
                Ok(r) => r,
                Err(_) => Err(format!("did not finish within {limit:?}")),
            },
        };
        match r {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1}s)", t.elapsed().as_secs_f64());
            }
            Err(e) => {
                println!(
                    "test {name} ... FAILED ({:.1}s)\n    {e}",
                    t.elapsed().as_secs_f64()
                );
                failed.push(name.to_string());
            }
        }
        after_each().await;
    }
    (passed, failed)
}

/// Prints the summary and returns the process exit code.
pub fn summary(passed: usize, failed: &[String]) -> i32 {
    for f in failed {
        eprintln!("FAILED: {f}");
    }
    println!("{} passed, {} failed", passed, failed.len());
    if failed.is_empty() {
        0
    } else {
        1
    }
}

pub fn dir_entries(p: &Path) -> Vec<String> {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` is a live process (not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rfind(')')
                .and_then(|i| s[i + 1..].trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Live children of `parent`: (pid, comm).
pub fn children_of(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // rest[0] = state, rest[1] = ppid
        if rest.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent)
            && !matches!(rest.first(), Some(&"Z") | Some(&"X"))
        {
            out.push((pid, comm));
        }
    }
    out
}

/// Waits up to `limit` for `pid` to die; false when it is still alive.
pub async fn wait_pid_gone(pid: u32, limit: Duration) -> bool {
    let t = Instant::now();
    while pid_alive(pid) {
        if t.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Live processes other than this one whose command line or working
/// directory is inside `dir` (supervisors and VMMs of its VMs).
pub fn processes_in(dir: &Path) -> Vec<(u32, String)> {
    let dir = dir.display().to_string();
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || !pid_alive(pid) {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if cmd.contains(&dir) || cwd.starts_with(&dir) {
            out.push((pid, cmd.chars().take(120).collect()));
        }
    }
    out
}

/// No process is left in `dir`, allowing 5 s for them to exit.
pub async fn no_processes_in(dir: &Path) -> Result<(), String> {
    let t = Instant::now();
    let mut p = processes_in(dir);
    while !p.is_empty() && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        p = processes_in(dir);
    }
    check!(p.is_empty(), "leaked processes: {p:#?}");
    Ok(())
}

/// Last resort: kills every process in `dir`, a temp dir of the test's.
pub fn kill_processes_in(dir: &Path) {
    for (pid, _) in processes_in(dir) {
        // SAFETY: kill(2) of a process whose command line or cwd is in the
        // test's own temp dir.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}
