//! A tiny harness for tests that share one booted VM (booting under TCG takes
//! seconds): named cases, a filter from argv, and the plain closing line
//! `N passed, N failed`.

#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;

pub type CaseFn<'a, T> =
    Box<dyn Fn(&'a T) -> Pin<Box<dyn Future<Output = Result<(), String>> + 'a>> + 'a>;

/// Isolates the test run's state (the image cache stays shared).
pub fn isolated_data_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("smolvm-test-")
        .tempdir()
        .expect("temp dir");
    std::env::set_var("SMOLVM_DATA_DIR", d.path());
    d
}

pub fn filter() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect()
}

pub fn selected(name: &str, filters: &[String]) -> bool {
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

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
    ($a:expr, $b:expr) => {{
        let (a, b) = (&$a, &$b);
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
    }};
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
