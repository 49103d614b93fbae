//! Progress bars on long work, only when a person is watching a terminal.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct BarProgress {
    bar: Option<ProgressBar>,
}

impl BarProgress {
    pub fn new(enabled: bool, label: &str) -> BarProgress {
        let bar = enabled.then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(label.to_string());
            b
        });
        BarProgress { bar }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl coldclone_repository::Progress for BarProgress {
    fn set_total(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_length(bytes);
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
}

/// Bars go to stderr; show them only when it is a terminal.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
