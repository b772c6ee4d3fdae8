//! Progress on stderr for steps that can take more than a second or two
//! (the searches now; loading, training and curation to come): a bar when
//! the amount of work is known, a spinner with the elapsed time when it is
//! not. Drawn only when stderr is a terminal, never with `quiet`, so logs and
//! pipes get no control characters.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar or spinner; cleared when finished or dropped.
pub struct Progress(ProgressBar);

impl Progress {
    /// A bar over `total` units of `what` (e.g. "queries").
    pub fn bar(total: u64, what: &str, quiet: bool) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(total), target(quiet));
        let style = ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {what} ({{eta}} left)"
        ))
        .expect("a valid progress template");
        bar.set_style(style.progress_chars("=> "));
        Progress(bar)
    }

    /// A spinner saying `what` is going on, with the time it has taken.
    pub fn spinner(what: &str, quiet: bool) -> Progress {
        let bar = ProgressBar::with_draw_target(None, target(quiet));
        let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .expect("a valid progress template");
        bar.set_style(style);
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress(bar)
    }

    /// A bar over `total` units of `what` with a message after it (set with
    /// [`Progress::set_message`]).
    pub fn bar_with_message(total: u64, what: &str, quiet: bool) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(total), target(quiet));
        let style = ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {what} {{msg}} ({{eta}} left)"
        ))
        .expect("a valid progress template");
        bar.set_style(style.progress_chars("=> "));
        Progress(bar)
    }

    /// Sets the text after the bar.
    pub fn set_message(&self, message: String) {
        self.0.set_message(message);
    }

    /// Moves the bar to `pos` units done.
    pub fn set_position(&self, pos: u64) {
        self.0.set_position(pos);
    }

    /// Advances the bar by `n` units.
    pub fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    /// Whether anything is drawn (stderr is a terminal and not quiet).
    pub fn is_drawn(&self) -> bool {
        !self.0.is_hidden()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn target(quiet: bool) -> ProgressDrawTarget {
    if quiet {
        ProgressDrawTarget::hidden()
    } else {
        // Hidden by indicatif itself when stderr is not a terminal.
        ProgressDrawTarget::stderr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_or_not_a_terminal_draws_nothing() {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        assert_eq!(Progress::bar(10, "rows", false).is_drawn(), terminal);
        assert_eq!(Progress::spinner("searching", false).is_drawn(), terminal);
        let bar = Progress::bar(10, "rows", true);
        bar.inc(3);
        assert!(!bar.is_drawn());
        assert_eq!(bar.0.position(), 3);
    }
}
