//! Pacing of prompt chunks beside decoding requests. A step that reads prompt rows while
//! others decode takes longer, and their next token waits for it; a fixed row budget bounds
//! that only for one model, machine and prompt position. The pacer keeps running estimates
//! of what a decode row and a prompt row each add to a step and lets a step take as many
//! prompt rows as keep it within `slowdown` times the same step's decode rows alone.
//!
//! With a prompt lane (the scheduler's decode rounds and a prompt's chunk on threads of
//! their own, side by side) the prompt's rows add nothing to the decode rounds' time: its
//! chunks are sized by the time they take in their lane ([`LANE_SECS`]), and the slowdown
//! is not used.

/// Weight of the old estimate in each update.
const KEEP: f64 = 0.7;
/// Prompt rows of a mixed step before any prompt row has been timed.
const FIRST: usize = 8;
/// Seconds of work a prompt lane's chunk is sized for: long chunks read a prompt faster
/// (the weights are read once a chunk), and the lane waits for the decode lane's round in
/// progress once a chunk (under a tenth of this); but requests arriving meanwhile wait for
/// the chunk's end to be admitted.
pub const LANE_SECS: f64 = 0.4;
/// A prompt lane's chunk before one has been timed, and the fewest rows after.
const LANE_FIRST: usize = 64;
const LANE_MIN: usize = 16;

#[derive(Clone, Debug)]
pub struct Pacer {
    slowdown: f64,
    /// Seconds a decode row adds to a step (a decode-only step over its rows).
    decode_row: Option<f64>,
    /// Seconds a prompt row adds to a step (what the decode rows do not explain).
    prompt_row: Option<f64>,
    /// With lanes: seconds a prompt row takes in its lane.
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

    /// Rows of a prompt lane's chunk (see the scheduler's `lane_step`): about [`LANE_SECS`]
    /// of that lane's work, at least `LANE_MIN`, at most `budget` and the `left` rows of
    /// the prompt; `LANE_FIRST` before a chunk has been timed.
    pub fn lane_prompt_rows(&self, left: usize, budget: usize) -> usize {
        let rows = match self.lane_prompt_row.filter(|p| *p > 0.0) {
            Some(p) => ((LANE_SECS / p).floor() as usize).max(LANE_MIN),
            None => LANE_FIRST,
        };
        rows.min(budget).min(left).max(1)
    }

    /// Learns from a prompt lane's chunk of `rows` rows that took `secs`.
    pub fn observe_lane(&mut self, rows: usize, secs: f64) {
        if rows > 0 && secs.is_finite() && secs >= 0.0 {
            self.lane_prompt_row = ewma(self.lane_prompt_row, secs / rows as f64);
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

    /// A prompt lane's chunk: LANE_SECS of its rows as last timed, within the bounds.
    #[test]
    fn lane_chunks_are_sized_by_their_time() {
        let mut pacer = Pacer::new(2.0);
        assert_eq!(pacer.lane_prompt_rows(4096, 512), LANE_FIRST);
        assert_eq!(pacer.lane_prompt_rows(10, 512), 10);
        // 4 ms a row: LANE_SECS / 4 ms rows (one fewer where the division rounds down).
        pacer.observe_lane(64, 64.0 * 4e-3);
        let want = (LANE_SECS / 4e-3) as usize;
        assert!((want - 1..=want).contains(&pacer.lane_prompt_rows(4096, 512)));
        // The budget, what is left and the least.
        assert_eq!(pacer.lane_prompt_rows(4096, 20), 20);
        assert_eq!(pacer.lane_prompt_rows(3, 512), 3);
        for _ in 0..40 {
            pacer.observe_lane(16, 16.0);
        }
        assert_eq!(pacer.lane_prompt_rows(4096, 512), LANE_MIN);
        // Garbage times change nothing.
        pacer.observe_lane(16, f64::NAN);
        pacer.observe_lane(16, -1.0);
        pacer.observe_lane(0, 1.0);
        assert_eq!(pacer.lane_prompt_rows(4096, 512), LANE_MIN);
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
