//! Progress display for long operations (image build, boot) on stderr.

use indicatif::{ProgressBar, ProgressStyle};
use smolvm::image::ImageEvent;
use smolvm::sandbox::Progress;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

pub type Callback = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A spinner on stderr showing steps and the latest log line. When stderr
/// is not a terminal, step lines are printed plainly instead.
pub struct Reporter {
    pb: ProgressBar,
    quiet: bool,
}

impl Reporter {
    pub fn new(quiet: bool) -> Reporter {
        let tty = std::io::stderr().is_terminal();
        let pb = if quiet || !tty {
            ProgressBar::hidden()
        } else {
            ProgressBar::new_spinner()
        };
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed}] {prefix}{wide_msg}")
        {
            pb.set_style(style);
        }
        if tty && !quiet {
            pb.enable_steady_tick(Duration::from_millis(120));
        }
        Reporter { pb, quiet }
    }

    pub fn callback(&self) -> Callback {
        let pb = self.pb.clone();
        let plain = !self.quiet && !std::io::stderr().is_terminal();
        Arc::new(move |p: &Progress| match p {
            Progress::Image(ImageEvent::Step {
                index,
                total,
                label,
            }) => {
                pb.set_prefix(format!("image [{index}/{total}] "));
                pb.set_message(label.clone());
                if plain {
                    eprintln!("smolvm: image step {index}/{total}: {label}");
                }
            }
            Progress::Image(ImageEvent::Log(line)) => pb.set_message(line.clone()),
            Progress::Image(ImageEvent::Done { elapsed, .. }) => {
                pb.set_prefix(String::new());
                pb.set_message(format!("image ready in {:.1}s", elapsed.as_secs_f64()));
                if plain {
                    eprintln!("smolvm: image ready in {:.1}s", elapsed.as_secs_f64());
                }
            }
            Progress::Step(s) => {
                pb.set_prefix(String::new());
                pb.set_message(s.clone());
            }
        })
    }

    pub fn clear(&self) {
        self.pb.finish_and_clear();
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.pb.finish_and_clear();
    }
}
