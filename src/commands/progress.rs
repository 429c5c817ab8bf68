//! Progress of a long run on stderr: an indicatif bar on a terminal; elsewhere (a log file,
//! CI, a pipe) one plain line every few seconds or every tenth of the way, so a long run is
//! never silent and a log is not flooded with redraws.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds between plain lines when stderr is not a terminal (`LONGCTX_PROGRESS_SECS`
/// overrides it; tests set 0 to see every step).
const EVERY: Duration = Duration::from_secs(5);
/// A run shorter than this prints no plain line at 10% steps, only at `EVERY`.
const QUIET_START: Duration = Duration::from_secs(2);

/// Progress of `len` steps of `what` (`what` is the line's prefix: "perplexity", "passkey").
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    lines: Mutex<Lines>,
}

/// The plain-line state: where the run is and when a line was last printed.
struct Lines {
    what: String,
    unit: &'static str,
    len: u64,
    pos: u64,
    start: Instant,
    last: Instant,
    /// Tenths of the way already reported.
    tenths: u64,
    every: Duration,
}

impl Lines {
    /// The line to print after moving to `pos` at `now`, if one is due: after `every`
    /// since the last, or at a new tenth of the way once the run has lasted `QUIET_START`.
    fn step(&mut self, pos: u64, now: Instant) -> Option<String> {
        self.pos = pos.min(self.len);
        let tenths = (self.pos * 10).checked_div(self.len).unwrap_or(10);
        let elapsed = now.duration_since(self.start);
        let due = now.duration_since(self.last) >= self.every
            || tenths > self.tenths && (elapsed >= QUIET_START || self.every.is_zero());
        if !due {
            return None;
        }
        self.last = now;
        self.tenths = tenths;
        let s = elapsed.as_secs_f64();
        let pct = (self.pos * 100).checked_div(self.len).unwrap_or(100);
        let eta = if self.pos > 0 && self.pos < self.len {
            format!(
                ", eta {:.0} s",
                s * (self.len - self.pos) as f64 / self.pos as f64
            )
        } else {
            String::new()
        };
        let unit = if self.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", self.unit)
        };
        Some(format!(
            "{}: {}/{}{unit} ({pct}%), {s:.0} s{eta}",
            self.what, self.pos, self.len
        ))
    }
}

/// A progress report of `len` steps on stderr (a bar on a terminal, plain lines elsewhere).
pub fn progress_bar(len: u64, what: &str) -> Progress {
    Progress::new(len, what, "")
}

impl Progress {
    /// `unit` names a step in the plain lines ("tokens", "cells"; "" for none).
    pub fn new(len: u64, what: &str, unit: &'static str) -> Progress {
        let every = std::env::var("LONGCTX_PROGRESS_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(EVERY, Duration::from_secs_f64);
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(len);
            // The unit is part of the template (indicatif has no field for it); braces in it
            // would be template syntax, so they are dropped.
            let unit: String = unit.chars().filter(|c| !matches!(c, '{' | '}')).collect();
            let unit = if unit.is_empty() {
                unit
            } else {
                format!(" {unit}")
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{prefix}} [{{bar:30}}] {{pos}}/{{len}}{unit} ({{percent}}%), \
                     {{elapsed}}, eta {{eta}} {{msg}}"
                ))
                .expect("a valid template"),
            );
            bar.set_prefix(what.to_string());
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            lines: Mutex::new(Lines {
                what: what.to_string(),
                unit,
                len,
                pos: 0,
                start: now,
                last: now,
                tenths: 0,
                every,
            }),
        }
    }

    pub fn set_position(&self, pos: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
            return;
        }
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(line) = l.step(pos, Instant::now()) {
            eprintln!("{line}");
        }
    }

    pub fn inc(&self, n: u64) {
        let pos = match &self.bar {
            Some(bar) => bar.position(),
            None => self.lines.lock().unwrap_or_else(|p| p.into_inner()).pos,
        };
        self.set_position(pos.saturating_add(n));
    }

    /// A short note after the counts on a terminal's bar ("12.3 tok/s"); plain lines omit it.
    pub fn set_message(&self, msg: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
        }
    }

    /// Runs `f` (which prints to stdout) with the bar hidden, so the two do not interleave.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    /// Removes the bar; the command prints its own result next.
    pub fn finish_and_clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(len: u64, every: Duration, start: Instant) -> Lines {
        Lines {
            what: "perplexity".into(),
            unit: "tokens",
            len,
            pos: 0,
            start,
            last: start,
            tenths: 0,
            every,
        }
    }

    /// Without a terminal a long run prints a line every few seconds and at each tenth, a
    /// short one nothing (perplexity once ran minutes without a word on a pipe).
    #[test]
    fn plain_lines_every_few_seconds_and_every_tenth() {
        let t0 = Instant::now();
        let s = |x: f64| t0 + Duration::from_secs_f64(x);
        let mut l = lines(1000, EVERY, t0);
        // A short run: tenths pass in the first second, no line.
        assert_eq!(l.step(300, s(0.5)), None);
        // 6 s later: due by time.
        let line = l.step(350, s(6.0)).expect("a line after 5 s");
        assert_eq!(line, "perplexity: 350/1000 tokens (35%), 6 s, eta 11 s");
        // A new tenth after the quiet start: due at once.
        assert!(l.step(400, s(6.5)).is_some());
        assert_eq!(l.step(450, s(7.0)), None, "same tenth, 0.5 s later");
        assert!(l.step(1000, s(7.5)).unwrap().contains("(100%), 8 s"));
        // Zero steps do not divide by zero.
        let mut l = lines(0, Duration::ZERO, t0);
        assert!(l.step(0, s(1.0)).unwrap().contains("0/0 tokens (100%)"));
    }
}
