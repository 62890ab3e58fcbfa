//! Training progress on a terminal: one bar redrawn in place (done, images/s, ETA, loss). Off a
//! terminal (a log file, CI) nothing is drawn: the periodic plain lines say the same.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    tty: bool,
    total: usize,
    /// Where this run started counting (a resumed epoch starts inside).
    first: usize,
    start: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    /// Progress over `total` units, of which `first` were done before this process started.
    pub fn new(total: usize, first: usize, enabled: bool) -> Progress {
        Progress {
            tty: enabled && std::io::stderr().is_terminal(),
            total,
            first,
            start: Instant::now(),
            drawn: None,
        }
    }

    /// Whether the bar is drawn (a terminal), so plain progress lines are not needed.
    pub fn is_drawn(&self) -> bool {
        self.tty
    }

    /// Redraws the bar at `done` units, at most ten times a second.
    pub fn update(&mut self, done: usize, images: usize, label: &str, status: &str) {
        if !self.tty
            || self
                .drawn
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.drawn = Some(Instant::now());
        let secs = self.start.elapsed().as_secs_f64();
        let fraction = done as f64 / self.total.max(1) as f64;
        let rate = (done - self.first.min(done)) as f64 / secs.max(1e-9);
        let eta = (self.total.saturating_sub(done)) as f64 / rate.max(1e-9);
        let width = 30;
        let filled = ((fraction * width as f64) as usize).min(width);
        let line = format!(
            "\r\x1b[K{label} [{}{}] {:>3.0}% {:.0} img/s ETA {}  {status}",
            "#".repeat(filled),
            ".".repeat(width - filled),
            100.0 * fraction,
            images as f64 / secs.max(1e-9),
            clock(eta)
        );
        let mut err = std::io::stderr();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
    }

    /// Clears the bar (before other output, and at the end).
    pub fn clear(&mut self) {
        if self.tty && self.drawn.take().is_some() {
            let _ = std::io::stderr().write_all(b"\r\x1b[K");
        }
    }
}

/// `1h02m`, `3m05s`, `42s`.
pub fn clock(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reads_like_a_person_writes() {
        assert_eq!(clock(42.4), "42s");
        assert_eq!(clock(185.0), "3m05s");
        assert_eq!(clock(3720.0), "1h02m");
        assert_eq!(clock(f64::INFINITY), "?");
    }

    #[test]
    fn nothing_is_drawn_off_a_terminal() {
        // Tests run with stderr captured (not a terminal), like CI and log files.
        let mut p = Progress::new(10, 0, true);
        p.update(5, 40, "epoch 1/1", "");
        assert!(!p.is_drawn() && p.drawn.is_none());
    }
}
