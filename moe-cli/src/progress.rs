//! A progress bar on stderr that appears only once a run has lasted a second, and never when stderr is not a
//! terminal.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress over a known number of steps.
pub(crate) struct Progress {
    bar: ProgressBar,
    start: Instant,
}

impl Progress {
    pub(crate) fn new(steps: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}") {
            bar.set_style(style);
        }
        Progress {
            bar,
            start: Instant::now(),
        }
    }

    /// Starts the next step, named `what`.
    pub(crate) fn step(&self, what: &str) {
        if self.bar.position() > 0 || self.bar.message() != "" {
            self.bar.inc(1);
        }
        self.bar.set_message(what.to_string());
        if self.bar.is_hidden() && self.start.elapsed() > Duration::from_secs(1) {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    }

    /// Prints a line above the bar (or plainly when it is hidden).
    pub(crate) fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.suspend(|| eprintln!("{line}"));
        }
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The progress of `moe train`: one bar over the steps of every run, with the run's label, its last training
/// and validation loss, and the time left (indicatif's ETA over all runs). Drawn on stderr only when it is a
/// terminal.
pub(crate) struct TrainProgress {
    bar: ProgressBar,
    /// Steps of the runs before the current one.
    base: u64,
    label: String,
    last_val: Option<f64>,
}

impl TrainProgress {
    /// A bar over `total` steps (all runs together).
    pub(crate) fn new(total: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        ) {
            bar.set_style(style);
        }
        TrainProgress {
            bar,
            base: 0,
            label: String::new(),
            last_val: None,
        }
    }

    /// Starts the run `label`, after runs that took `done` steps in all.
    pub(crate) fn start_run(&mut self, label: &str, done: u64) {
        self.base = done;
        self.label = label.to_string();
        self.last_val = None;
        self.bar.set_position(done);
        self.bar.set_message(label.to_string());
    }

    /// Prints a line above the bar (or plainly when it is hidden).
    pub(crate) fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.suspend(|| eprintln!("{line}"));
        }
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl moe_train::Progress for TrainProgress {
    fn step(&mut self, step: usize, _total: usize, loss: f64) {
        self.bar.set_position(self.base + step as u64);
        let val = self
            .last_val
            .map_or(String::new(), |v| format!(", val {v:.4}"));
        self.bar
            .set_message(format!("{}: loss {loss:.4}{val}", self.label));
    }

    fn eval(&mut self, _step: usize, val_loss: f64) {
        self.last_val = Some(val_loss);
    }
}
