//! Pacing of prompt chunks beside decoding requests. A step that reads prompt rows while
//! others decode takes longer, and their next token waits for it; a fixed row budget bounds
//! that only for one model, machine and prompt position. The pacer keeps running estimates
//! of what a decode row and a prompt row each add to a step and lets a step take as many
//! prompt rows as keep it within `slowdown` times the same step's decode rows alone.
//!
//! With a prompt lane (the scheduler's decode rows and prompt rows on threads of their own,
//! side by side) the prompt rows add nothing to the decode rows' time but their lane's own:
//! a step then takes as many prompt rows as its lane reads while the decode lane computes,
//! within `slowdown` times the decode rows alone on every thread.

/// Weight of the old estimate in each update.
const KEEP: f64 = 0.7;
/// Prompt rows of a mixed step before any prompt row has been timed.
const FIRST: usize = 8;

#[derive(Clone, Debug)]
pub struct Pacer {
    slowdown: f64,
    /// Seconds a decode row adds to a step (a decode-only step over its rows).
    decode_row: Option<f64>,
    /// Seconds a prompt row adds to a step (what the decode rows do not explain).
    prompt_row: Option<f64>,
    /// With lanes: seconds a decode row takes in its lane, and a prompt row in its own.
    lane_decode_row: Option<f64>,
    lane_prompt_row: Option<f64>,
}

fn ewma(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| KEEP * o + (1.0 - KEEP) * new))
}

impl Pacer {
    /// `slowdown` <= 1 (or not finite) turns pacing off: a step takes its whole budget.
    pub fn new(slowdown: f64) -> Pacer {
        Pacer {
            slowdown,
            decode_row: None,
            prompt_row: None,
            lane_decode_row: None,
            lane_prompt_row: None,
        }
    }

    fn on(&self) -> bool {
        self.slowdown.is_finite() && self.slowdown > 1.0
    }

    /// Prompt rows a step with `decode_rows` decode rows may take, at most `budget`. At least
    /// one once a decode row has been timed, so a prompt always moves; none before that, so
    /// the first such step times the decode rows alone.
    pub fn prompt_rows(&self, decode_rows: usize, budget: usize) -> usize {
        if decode_rows == 0 || !self.on() {
            return budget;
        }
        let Some(d) = self.decode_row else {
            return 0;
        };
        let Some(p) = self.prompt_row.filter(|p| *p > 0.0) else {
            return budget.min(FIRST);
        };
        let rows = (self.slowdown - 1.0) * decode_rows as f64 * d / p;
        (rows.floor() as usize).clamp(1, budget.max(1)).min(budget)
    }

    /// [`Pacer::prompt_rows`] for a step whose prompt rows run in a lane of their own beside
    /// the decode lane: as many as the prompt lane reads in the decode lane's time (so
    /// neither waits long for the other), within `slowdown` times the decode rows' time
    /// alone on every thread; at least one.
    pub fn lane_prompt_rows(&self, decode_rows: usize, budget: usize) -> usize {
        if decode_rows == 0 || !self.on() {
            return budget;
        }
        let n = decode_rows as f64;
        let lane = self.lane_decode_row.map(|d| n * d);
        let bound = self.decode_row.map(|d| self.slowdown * n * d);
        let target = match (lane, bound) {
            (Some(l), Some(b)) => l.min(b),
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => return budget.min(FIRST),
        };
        let Some(p) = self.lane_prompt_row.filter(|p| *p > 0.0) else {
            return budget.min(FIRST);
        };
        ((target / p).floor() as usize)
            .clamp(1, budget.max(1))
            .min(budget)
    }

    /// Learns from a step run in two lanes: its decode rows took `decode_secs` in theirs,
    /// its prompt rows `prompt_secs` in theirs.
    pub fn observe_lanes(
        &mut self,
        (decode_rows, decode_secs): (usize, f64),
        (prompt_rows, prompt_secs): (usize, f64),
    ) {
        let ok = |s: f64| s.is_finite() && s >= 0.0;
        if decode_rows > 0 && ok(decode_secs) {
            self.lane_decode_row = ewma(self.lane_decode_row, decode_secs / decode_rows as f64);
        }
        if prompt_rows > 0 && ok(prompt_secs) {
            self.lane_prompt_row = ewma(self.lane_prompt_row, prompt_secs / prompt_rows as f64);
        }
    }

    /// Learns from a step that took `secs`.
    pub fn observe(&mut self, decode_rows: usize, prompt_rows: usize, secs: f64) {
        if !secs.is_finite() || secs < 0.0 {
            return;
        }
        if prompt_rows == 0 {
            if decode_rows > 0 {
                self.decode_row = ewma(self.decode_row, secs / decode_rows as f64);
            }
            return;
        }
        let decode = decode_rows as f64 * self.decode_row.unwrap_or(0.0);
        let per = ((secs - decode) / prompt_rows as f64).max(0.0);
        self.prompt_row = ewma(self.prompt_row, per);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine where a step costs 1 ms a decode row and 2 ms a prompt row (plus noise):
    /// the pacer keeps mixed steps near twice the decode-only time.
    #[test]
    fn mixed_steps_stay_within_the_slowdown_of_decode_alone() {
        let cost = |d: usize, p: usize| 1e-3 * d as f64 + 2e-3 * p as f64;
        let mut pacer = Pacer::new(2.0);
        // Prompts alone (nothing decodes): the whole budget.
        assert_eq!(pacer.prompt_rows(0, 512), 512);
        pacer.observe(0, 512, cost(0, 512));
        // Decoding starts: the first mixed step is decode rows alone, to time them.
        assert_eq!(pacer.prompt_rows(16, 496), 0);
        pacer.observe(16, 0, cost(16, 0));
        for step in 0..50 {
            let p = pacer.prompt_rows(16, 496);
            // 16 ms of decode rows allow 16 ms of prompt rows at 2 ms: 8.
            assert!(p >= 1, "step {step}: the prompt must move");
            let t = cost(16, p) * if step % 2 == 0 { 1.05 } else { 0.95 };
            assert!(t <= 2.0 * cost(16, 0) * 1.1, "step {step}: {p} rows, {t} s");
            pacer.observe(16, p, t);
        }
        assert!((7..=9).contains(&pacer.prompt_rows(16, 496)));
        // Bounded by the row budget, and off when asked.
        assert_eq!(pacer.prompt_rows(16, 3), 3);
        assert_eq!(Pacer::new(0.0).prompt_rows(16, 496), 496);
    }

    /// In lanes: a step takes as many prompt rows as their lane reads in the decode lane's
    /// time, within the slowdown of the decode rows alone.
    #[test]
    fn lanes_balance_the_prompt_lane_against_the_decode_lane() {
        let mut pacer = Pacer::new(2.0);
        // Nothing timed: a first few rows.
        assert_eq!(pacer.lane_prompt_rows(16, 496), FIRST);
        // Decode alone on every thread: 1 ms a row; in its lane 1.5 ms; a prompt row 2 ms.
        pacer.observe(16, 0, 16e-3);
        assert_eq!(pacer.lane_prompt_rows(16, 496), FIRST);
        for _ in 0..30 {
            pacer.observe_lanes((16, 24e-3), (8, 16e-3));
        }
        // 24 ms of the decode lane hold 12 prompt rows of 2 ms (11 where the division rounds
        // down).
        assert!((11..=12).contains(&pacer.lane_prompt_rows(16, 496)));
        // A decode lane slower than the bound: the bound (2 x 16 ms) rules.
        for _ in 0..30 {
            pacer.observe_lanes((16, 64e-3), (8, 16e-3));
        }
        let rows = pacer.lane_prompt_rows(16, 496);
        assert!((15..=16).contains(&rows), "{rows}");
        // Prompt rows alone, the budget, and pacing off: as without lanes.
        assert_eq!(pacer.lane_prompt_rows(0, 512), 512);
        assert_eq!(pacer.lane_prompt_rows(16, 3), 3);
        assert_eq!(Pacer::new(0.0).lane_prompt_rows(16, 496), 496);
        // Garbage times change nothing.
        pacer.observe_lanes((16, f64::NAN), (8, -1.0));
        assert_eq!(pacer.lane_prompt_rows(16, 496), rows);
    }

    /// Prompt rows that get dearer (attention over a longer prefix) get fewer.
    #[test]
    fn dearer_prompt_rows_get_fewer() {
        let mut pacer = Pacer::new(2.0);
        pacer.observe(16, 0, 16e-3);
        pacer.observe(16, 8, 32e-3);
        for _ in 0..20 {
            pacer.observe(16, 4, 32e-3);
        }
        assert_eq!(pacer.prompt_rows(16, 496), 4);
        // Garbage times change nothing.
        pacer.observe(16, 4, f64::NAN);
        pacer.observe(16, 4, -1.0);
        assert_eq!(pacer.prompt_rows(16, 496), 4);
    }
}
