//! The closing statistics of a generation, the same for `generate`, `ask` and `chat`: prompt
//! tokens, prefill speed, time to the first token (counting the prefill), decode speed and
//! the KV cache's bytes per tier. One line of words on stderr, or with `--json` one JSON
//! object as stderr's last line (stdout keeps only the answer).

use longctx_kvstore::KvStore;
use serde::Serialize;
use std::time::Instant;

/// `--json` of the commands that generate, with the help that says where it goes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct StatsOpts {
    /// Print the closing statistics as one JSON object on stderr's last line instead of a
    /// sentence (stdout keeps only the answer): prompt_tokens, cached_tokens, prefill_s,
    /// prefill_tok_s, first_token_s (seconds from the start of the prefill), new_tokens,
    /// decode_s, decode_tok_s, kv_bytes {device, host, disk}, setup_s. Default: off.
    #[arg(long)]
    pub json: bool,
}

/// KV cache bytes per tier at the end of a run.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvBytes {
    pub device: u64,
    pub host: u64,
    pub disk: u64,
}

impl KvBytes {
    pub fn of(store: &KvStore) -> KvBytes {
        let [device, host, disk] = store.usage().bytes;
        KvBytes { device, host, disk }
    }
}

/// What a generation measured. Times are seconds; the time to the first token runs from the
/// start of the prefill (model loading excluded) to the first new token, so it is never
/// less than `prefill_s`.
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
pub struct RunStats {
    /// Prompt tokens computed by this run's prefill.
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV was reused (a snapshot, an earlier turn), not computed.
    pub cached_tokens: usize,
    pub prefill_s: f64,
    pub prefill_tok_s: f64,
    pub first_token_s: f64,
    pub new_tokens: usize,
    /// Seconds after the first new token, for the rest.
    pub decode_s: f64,
    pub decode_tok_s: f64,
    pub kv_bytes: KvBytes,
    /// Seconds of the command before its prefill began (loading the model, reading and
    /// packing files): the first token came `setup_s + first_token_s` after the command's
    /// start. Absent where the clock has no command start (a chat turn).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_s: Option<f64>,
    /// Under `--expert-budget`: expert bytes read, hits and misses, resident peak.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts: Option<longctx_engine::experts::ExpertStats>,
}

/// Clocks a generation: `start` before the prefill, `prefilled` after it, `first_token` at the
/// first new token, `finish` at the end.
pub struct Clock {
    start: Instant,
    setup_s: Option<f64>,
    prefill_s: Option<f64>,
    first_s: Option<f64>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::start()
    }
}

impl Clock {
    pub fn start() -> Clock {
        Clock {
            start: Instant::now(),
            setup_s: None,
            prefill_s: None,
            first_s: None,
        }
    }

    /// A clock started now, in a command that started at `command_start`.
    pub fn start_after(command_start: Instant) -> Clock {
        Clock {
            setup_s: Some(command_start.elapsed().as_secs_f64()),
            ..Clock::start()
        }
    }

    /// The prefill is done (call once; later calls keep the first time).
    pub fn prefilled(&mut self) {
        self.prefill_s
            .get_or_insert(self.start.elapsed().as_secs_f64());
    }

    /// A new token came (only the first one's time is kept).
    pub fn token(&mut self) {
        self.first_s
            .get_or_insert(self.start.elapsed().as_secs_f64());
    }

    /// The statistics of a run that prefilled `prompt_tokens` (reusing `cached_tokens` more),
    /// generated `new_tokens` and holds `kv` (`KvBytes::of(&store)`).
    pub fn finish(
        &self,
        prompt_tokens: usize,
        cached_tokens: usize,
        new_tokens: usize,
        kv: KvBytes,
    ) -> RunStats {
        let total = self.start.elapsed().as_secs_f64();
        let prefill_s = self.prefill_s.unwrap_or(total);
        let first_token_s = self.first_s.unwrap_or(total).max(prefill_s);
        let decode_s = total - first_token_s;
        RunStats {
            prompt_tokens,
            cached_tokens,
            prefill_s,
            prefill_tok_s: rate(prompt_tokens, prefill_s),
            first_token_s,
            new_tokens,
            decode_s,
            // The first token came from the prefill's logits: the decode steps made the rest.
            decode_tok_s: rate(new_tokens.saturating_sub(1), decode_s),
            kv_bytes: kv,
            setup_s: self.setup_s,
            experts: None,
        }
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if n == 0 || s <= 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

impl RunStats {
    /// The statistics in words, one line.
    pub fn sentence(&self) -> String {
        let cached = if self.cached_tokens > 0 {
            format!(" (+{} reused from the cache)", self.cached_tokens)
        } else {
            String::new()
        };
        let k = &self.kv_bytes;
        let since_start = match self.setup_s {
            Some(setup) => format!(
                " ({:.2} s after the command's start)",
                setup + self.first_token_s
            ),
            None => String::new(),
        };
        let experts = match &self.experts {
            Some(e) => format!("; {}", e.sentence()),
            None => String::new(),
        };
        format!(
            "{} prompt tokens{cached}, prefill {:.2} s ({:.1} tok/s); first token {:.2} s after \
             the prefill began{since_start}; {} new tokens, decode {:.1} tok/s; KV {} device, {} host, {} disk{experts}",
            self.prompt_tokens,
            self.prefill_s,
            self.prefill_tok_s,
            self.first_token_s,
            self.new_tokens,
            self.decode_tok_s,
            mib(k.device),
            mib(k.host),
            mib(k.disk),
        )
    }
}

/// Prints a generation's closing statistics on stderr: a sentence, or with `json` one JSON
/// object. `generate`, `ask` and `chat` end with this.
pub fn print_run_stats(stats: &RunStats, json: bool) {
    if json {
        match serde_json::to_string(stats) {
            Ok(s) => eprintln!("{s}"),
            Err(e) => eprintln!("warning: the statistics are not JSON ({e})"),
        }
    } else {
        eprintln!("{}", stats.sentence());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first token's time is never before the end of the prefill (generate once said
    /// "first token 0.00 s" after a 6.6 s prefill), and the decode rate leaves out the token
    /// the prefill produced.
    #[test]
    fn first_token_counts_the_prefill() {
        let mut c = Clock::start();
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.prefilled();
        c.token();
        let kv = KvBytes {
            device: 1 << 20,
            host: 0,
            disk: 0,
        };
        let s = c.finish(100, 0, 1, kv);
        assert!(
            s.prefill_s >= 0.02 && s.first_token_s >= s.prefill_s,
            "{s:?}"
        );
        assert!(s.prefill_tok_s > 0.0 && s.prefill_tok_s <= 100.0 / 0.02);
        assert_eq!(s.decode_tok_s, 0.0, "one new token: no decode steps");
        let v = serde_json::to_value(&s).unwrap();
        for k in [
            "prompt_tokens",
            "cached_tokens",
            "prefill_s",
            "prefill_tok_s",
            "first_token_s",
            "new_tokens",
            "decode_s",
            "decode_tok_s",
        ] {
            assert!(v[k].is_number(), "{k} in {v}");
        }
        assert!(v["kv_bytes"]["device"].is_u64() && v["kv_bytes"]["disk"].is_u64());
        let line = s.sentence();
        assert!(
            line.contains("first token") && line.contains("KV 1.0 MiB device"),
            "{line}"
        );
    }
}
