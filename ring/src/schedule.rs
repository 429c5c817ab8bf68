//! The ring's timeline from measured step compute times and a link model: what a ring of `p`
//! devices would take, for benchmarking on a machine that has one.
//!
//! Rank `r` starts step `s + 1` when it has finished step `s` and the shard for `s + 1` has
//! arrived; that shard left rank `r - 1` when `r - 1` started its step `s` (it forwards the
//! shard it is about to compute on), and takes the link's transfer time.

use std::time::Duration;

use crate::transport::LinkModel;

/// One rank's step in the timeline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slot {
    pub start: f64,
    pub compute: f64,
    /// Transfer time of the shard this step used (0 for the first step).
    pub transfer: f64,
    /// Seconds this step started late because the shard was still on the wire: waiting for a
    /// busy sender to reach the step is imbalance, not transfer, and is not counted.
    pub transfer_wait: f64,
    /// No transfer wait.
    pub hidden: bool,
}

/// The simulated ring: `slots[r][s]`, and the time at which the last rank finishes.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    pub slots: Vec<Vec<Slot>>,
    pub total: f64,
}

/// `compute[r][s]`: seconds of step `s` on rank `r`; `bytes[r]`: size of rank `r`'s KV shard.
pub fn simulate(compute: &[Vec<f64>], bytes: &[u64], link: &LinkModel) -> Timeline {
    let p = compute.len();
    let steps = compute.first().map_or(0, |c| c.len());
    let mut slots = vec![Vec::with_capacity(steps); p];
    for r in 0..p {
        slots[r].push(Slot {
            start: 0.0,
            compute: compute[r][0],
            transfer: 0.0,
            transfer_wait: 0.0,
            hidden: true,
        });
    }
    for s in 1..steps {
        for r in 0..p {
            let from = (r + p - 1) % p;
            // At step s rank r uses the shard of rank r - s, sent by r - 1 at its step s - 1.
            let shard = (r + p - s) % p;
            let transfer = link.transfer(bytes[shard]).as_secs_f64();
            let sent = slots[from][s - 1].start;
            let arrive = sent + transfer;
            let ready = slots[r][s - 1].start + slots[r][s - 1].compute;
            let transfer_wait = (arrive - ready.max(sent)).max(0.0).min(transfer);
            let transfer_wait = if arrive > ready { transfer_wait } else { 0.0 };
            slots[r].push(Slot {
                start: ready.max(arrive),
                compute: compute[r][s],
                transfer,
                transfer_wait,
                hidden: transfer_wait <= 1e-12,
            });
        }
    }
    let total = slots
        .iter()
        .filter_map(|s| s.last().map(|x| x.start + x.compute))
        .fold(0.0, f64::max);
    Timeline { slots, total }
}

/// A link model from GB/s and microseconds.
pub fn link(gb_per_s: f64, latency_us: f64) -> LinkModel {
    LinkModel {
        latency: Duration::from_secs_f64(latency_us * 1e-6),
        bandwidth: gb_per_s * 1e9,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_shorter_than_compute_are_hidden() {
        let compute = vec![vec![1.0; 4]; 4];
        let t = simulate(&compute, &[1_000_000_000; 4], &link(2.0, 0.0)); // 0.5 s each
        assert!((t.total - 4.0).abs() < 1e-9);
        assert!(t.slots.iter().flatten().all(|s| s.hidden));
    }

    #[test]
    fn transfers_longer_than_compute_set_the_pace() {
        let compute = vec![vec![1.0; 4]; 4];
        let t = simulate(&compute, &[4_000_000_000; 4], &link(2.0, 0.0)); // 2 s each
                                                                          // Step s starts at 2s (each transfer leaves when the sender starts its step).
        assert!((t.total - 7.0).abs() < 1e-9, "{}", t.total);
        assert!(!t.slots[0][1].hidden);
    }

    #[test]
    fn waiting_for_a_busy_sender_is_not_a_transfer_wait() {
        // Rank 3 is slow at step 0, so it forwards its step-1 shard late: rank 0 waits for it
        // at step 2, but only the wire time (1 ms) counts as transfer wait.
        let mut compute = vec![vec![0.1; 3]; 4];
        compute[3][0] = 5.0;
        let t = simulate(&compute, &[1_000_000; 4], &link(1.0, 0.0));
        let s = t.slots[0][2];
        assert!((s.start - 5.001).abs() < 1e-9, "{s:?}");
        assert!((s.transfer_wait - 0.001).abs() < 1e-9, "{s:?}");
    }
}
