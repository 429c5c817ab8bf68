//! `longctx chat`: a conversation on the model's chat template, typed in a terminal or read
//! line by line from a pipe.
//!
//! The conversation's KV is kept between turns: each turn renders the whole history with the
//! template and computes only the tokens past those the KV already holds. A template's
//! rendering of a history is usually a prefix of the next turn's; where it is not (a template
//! that dates its system message, an answer whose text tokenises otherwise than it was
//! generated, an answer cut short by Ctrl-C), the KV is cut back to the tokens both share,
//! as the server's prefix cache does.
//!
//! Ctrl-C during an answer stops that answer (what was said stays in the history). At the
//! prompt, Ctrl-C drops the line being typed (the terminal discards it) and a second Ctrl-C
//! in a row quits, as Node's REPL does; so do Ctrl-D (end of input) and `/exit`.

use crate::commands::{print_run_stats, Clock, KvBytes, StreamPrinter};
use anyhow::{Context, Result};
use longctx_engine::generate::{generate, Sampler, Sampling};
use longctx_engine::{EngineError, Loaded, Logits};
use longctx_kvstore::{KvStore, SeqId};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face model directory, or a hub name (org/name[:FILE]) in the
    /// local Hugging Face cache. Default: SmolLM2-135M-Instruct, fetched on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The system message (`/system TEXT` changes it). Default: none (the template's own
    /// default, where it has one).
    #[arg(long)]
    system: Option<String>,
    /// Longest answer per turn, in tokens. Default: 512.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// History plus answer allowed, in tokens; the oldest exchanges are left out past it.
    /// Default: the model's trained context.
    #[arg(long)]
    max_context: Option<usize>,
    #[command(flatten)]
    sampling: super::sampling::SamplingArgs,
    #[command(flatten)]
    decode: super::DecodeOpts,
    #[command(flatten)]
    stats: super::StatsOpts,
}

/// Prompt tokens computed per forward call: Ctrl-C is noticed between two, and a pasted
/// document's activations stay small.
const PREFILL_CHUNK: usize = 256;

/// What the Ctrl-C handler and the loop share.
#[derive(Default)]
struct Interrupts {
    /// An answer (its prefill or decode) is running: Ctrl-C stops it.
    answering: AtomicBool,
    /// Ctrl-C asked the running answer to stop.
    stop: AtomicBool,
    /// Ctrl-C presses at the prompt since the last line: the second quits.
    at_prompt: AtomicUsize,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1");
    // A repetition penalty by default: SmolLM2-135M otherwise repeats a sentence to the limit.
    let sampling = args.sampling.resolve(&Sampling::answering())?;
    let m = args.decode.open(&args.model)?;
    // Fails early, before the first question, on a model without a template.
    m.tokenizer
        .render_chat(&[("user", "hi")])
        .context("chat needs the model's chat template")?;
    let limit = args.max_context.unwrap_or(m.model.cfg.max_position);
    let store = m.model.kv_store(&args.decode.kv())?;
    let mut chat = Chat {
        seq: store.create_seq(),
        store,
        m: &m,
        kv: vec![],
        system: args.system.clone(),
        history: vec![],
        sampling,
        turns: 0,
        limit,
        max_tokens: args.max_tokens,
        json: args.stats.json,
    };
    let interactive = std::io::stdin().is_terminal();
    let irq = Arc::new(Interrupts::default());
    let handler = irq.clone();
    if let Err(e) = ctrlc::set_handler(move || on_ctrl_c(&handler, interactive)) {
        eprintln!("warning: Ctrl-C will end the chat, not only an answer ({e})");
    }
    if interactive {
        eprintln!(
            "chat: type a message; /reset clears the history, /system TEXT sets the system \
             message, /exit or Ctrl-D quits; Ctrl-C stops an answer"
        );
    }
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    loop {
        if interactive {
            prompt();
        }
        let Some(line) = read_message(&mut input, interactive)? else {
            break;
        };
        irq.at_prompt.store(0, Ordering::SeqCst);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, rest) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
            match name {
                "exit" | "quit" => break,
                "reset" => {
                    chat.reset()?;
                    eprintln!("history cleared");
                }
                "system" => {
                    let text = rest.trim();
                    chat.system = (!text.is_empty()).then(|| text.to_string());
                    chat.reset()?;
                    eprintln!(
                        "{}; history cleared",
                        if text.is_empty() {
                            "system message removed"
                        } else {
                            "system message set"
                        }
                    );
                }
                "help" => eprintln!(
                    "/reset clears the history and its KV; /system TEXT sets the system message \
                     (and resets; /system alone removes it); /exit quits; a line ending in \\ \
                     continues on the next; Ctrl-C stops an answer, twice at the prompt quits"
                ),
                _ => eprintln!("unknown command /{name} (/help lists them)"),
            }
            continue;
        }
        irq.stop.store(false, Ordering::SeqCst);
        irq.answering.store(true, Ordering::SeqCst);
        let done = chat.turn(line, &irq.stop);
        irq.answering.store(false, Ordering::SeqCst);
        if let Err(e) = done {
            // One failed turn (a message too long for the context) does not end the chat.
            eprintln!("error: {}", crate::one_line(&e));
        }
    }
    if interactive {
        eprintln!();
    }
    Ok(())
}

/// Ctrl-C: stops the running answer; at the prompt, the second press in a row quits.
fn on_ctrl_c(irq: &Interrupts, interactive: bool) {
    if irq.answering.load(Ordering::SeqCst) {
        irq.stop.store(true, Ordering::SeqCst);
    } else if interactive && irq.at_prompt.fetch_add(1, Ordering::SeqCst) == 0 {
        eprintln!("\n(Ctrl-C again, Ctrl-D or /exit quits)");
        prompt();
    } else {
        eprintln!();
        std::process::exit(130);
    }
}

fn prompt() {
    // On stderr, with the banner and statistics: stdout holds the answers only, also when
    // it is redirected to a file.
    eprint!("> ");
    let _ = std::io::stderr().flush();
}

/// The next message: a line, or lines joined while one ends in `\`. `None` at end of input.
fn read_message(input: &mut impl BufRead, interactive: bool) -> Result<Option<String>> {
    let mut msg = String::new();
    loop {
        let mut raw = vec![];
        if input.read_until(b'\n', &mut raw).context("reading stdin")? == 0 {
            return Ok((!msg.is_empty()).then_some(msg));
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\n', '\r']);
        match line.strip_suffix('\\') {
            Some(head) => {
                msg.push_str(head);
                msg.push('\n');
                if interactive {
                    eprint!(". ");
                    let _ = std::io::stderr().flush();
                }
            }
            None => {
                msg.push_str(line);
                return Ok(Some(msg));
            }
        }
    }
}

/// A conversation and the KV of its tokens.
struct Chat<'a> {
    m: &'a Loaded,
    store: KvStore,
    seq: SeqId,
    /// The tokens whose KV `seq` holds, in order.
    kv: Vec<u32>,
    system: Option<String>,
    /// (role, content) of the user's and assistant's turns so far.
    history: Vec<(&'static str, String)>,
    sampling: Sampling,
    /// Turns answered, which varies the sampler's seed from turn to turn.
    turns: u64,
    limit: usize,
    max_tokens: usize,
    /// Each turn's statistics as a JSON line instead of words (`--json`).
    json: bool,
}

impl Chat<'_> {
    /// Forgets the history and frees its KV.
    fn reset(&mut self) -> Result<()> {
        self.history.clear();
        self.fresh_seq()
    }

    fn fresh_seq(&mut self) -> Result<()> {
        self.store.free(self.seq)?;
        self.seq = self.store.create_seq();
        self.kv.clear();
        Ok(())
    }

    /// The token ids of the history with the user's `msg` last and the assistant's turn
    /// opened. The oldest exchanges are left out until the answer fits the context; a message
    /// that does not fit even alone is an error and leaves the history as it was.
    fn render(&mut self, msg: &str) -> Result<Vec<u32>> {
        let tok = &self.m.tokenizer;
        // Room for the answer, but never more than half the context (a --max-tokens as large
        // as the context would leave out every earlier message).
        let room = self.max_tokens.min(self.limit / 2);
        let mut first = 0;
        loop {
            let mut msgs: Vec<(&str, &str)> = vec![];
            if let Some(s) = &self.system {
                msgs.push(("system", s));
            }
            msgs.extend(self.history[first..].iter().map(|(r, c)| (*r, c.as_str())));
            msgs.push(("user", msg));
            let ids = tok.encode(&tok.render_chat(&msgs)?)?;
            if ids.len() + room <= self.limit || first == self.history.len() {
                anyhow::ensure!(
                    ids.len() < self.limit,
                    "a message of {} tokens (with the template) leaves no room for an answer \
                     within {} tokens; raise --max-context or shorten it",
                    ids.len(),
                    self.limit
                );
                if first > 0 {
                    eprintln!(
                        "(the {first} oldest messages are left out: the history no longer fits \
                         {} tokens)",
                        self.limit
                    );
                    self.history.drain(..first);
                }
                return Ok(ids);
            }
            // A user message and its answer at a time.
            first = (first + 2).min(self.history.len());
        }
    }

    /// One turn: the user's `msg`, the answer streamed to stdout, stats on stderr.
    fn turn(&mut self, msg: &str, stop: &AtomicBool) -> Result<()> {
        let m = self.m;
        let ids = self.render(msg)?;
        let budget = self.max_tokens.min(self.limit - ids.len());
        let reused = keep_shared_prefix(&self.store, &mut self.seq, &mut self.kv, &ids)?;
        let mut clock = Clock::start();
        let result = self.answer(&ids, budget, stop, &mut clock);
        // The KV now holds a prefix of the prompt and answer; a failure leaves it unknown.
        let (answer, stopped) = match result {
            Ok(r) => r,
            Err(e) => {
                self.fresh_seq()?;
                return Err(e);
            }
        };
        let held = self.store.len(self.seq, 0)?;
        self.kv = ids.iter().chain(&answer).copied().take(held).collect();
        let text = m.tokenizer.decode(&answer)?;
        if stopped {
            eprintln!("[stopped]");
        }
        // An answer stopped before its first token leaves the question unanswered: not kept.
        if !answer.is_empty() || !stopped {
            self.history.push(("user", msg.to_string()));
            self.history.push(("assistant", text));
        }
        let mut st = clock.finish(
            ids.len() - reused,
            reused,
            answer.len(),
            KvBytes::of(&self.store),
        );
        // Under --expert-budget: the totals so far (the cache lives as long as the chat).
        st.experts = self.m.model.expert_stats();
        if self.json {
            print_run_stats(&st, true);
        } else {
            eprintln!(
                "[prompt {} tokens: {reused} reused, {} new, {:.0} tok/s; answer {} tokens, first \
                 after {:.2} s, {:.1} tok/s; KV {:.1} MiB{}]",
                ids.len(),
                st.prompt_tokens,
                st.prefill_tok_s,
                st.new_tokens,
                st.first_token_s,
                st.decode_tok_s,
                st.kv_bytes.device as f64 / 1048576.0,
                st.experts
                    .map_or(String::new(), |e| format!("; {}", e.sentence())),
            );
        }
        Ok(())
    }

    /// Computes `ids` past the KV held, then streams up to `budget` answer tokens. Returns
    /// the answer's tokens and whether Ctrl-C stopped it.
    fn answer(
        &mut self,
        ids: &[u32],
        budget: usize,
        stop: &AtomicBool,
        clock: &mut Clock,
    ) -> Result<(Vec<u32>, bool)> {
        let m = self.m;
        let mut logits = vec![];
        let mut pos = self.kv.len();
        for chunk in ids[pos..].chunks(PREFILL_CHUNK) {
            if stop.load(Ordering::SeqCst) {
                println!();
                return Ok((vec![], true));
            }
            logits = m
                .model
                .forward(chunk, pos, &self.store, self.seq, Logits::Last, None, 4)?;
            pos += chunk.len();
        }
        clock.prefilled();
        // A sampler per answer: its penalties look at this answer's tokens only.
        self.turns += 1;
        let mut sampler = Sampler::new(Sampling {
            seed: self.sampling.seed.wrapping_add(self.turns - 1),
            ..self.sampling.clone()
        });
        let mut printer = StreamPrinter::default();
        let mut answer = vec![];
        let done = generate(
            &m.model,
            &self.store,
            self.seq,
            ids.len(),
            &logits,
            budget,
            &mut sampler,
            &m.stop_tokens(),
            None,
            4,
            |t| {
                if stop.load(Ordering::SeqCst) {
                    return Err(EngineError::Stopped);
                }
                clock.token();
                answer.push(t);
                printer.push(&m.tokenizer, t)
            },
        );
        let stopped = match done {
            Ok(_) => false,
            Err(EngineError::Stopped) => true,
            Err(e) => return Err(e.into()),
        };
        printer.finish(&m.tokenizer.decode(&answer)?);
        Ok((answer, stopped))
    }
}

/// Cuts `seq`, whose KV holds `kv`, back to the longest prefix it shares with `ids`, never
/// all of `ids` (the last prompt token is computed again, for its logits). Where a
/// chunked-local layer has already let go of the blocks before the cut (Llama 4), starts a
/// fresh sequence instead. Returns how many tokens of `ids` the KV holds.
fn keep_shared_prefix(
    store: &KvStore,
    seq: &mut SeqId,
    kv: &mut Vec<u32>,
    ids: &[u32],
) -> Result<usize> {
    let shared = kv
        .iter()
        .zip(ids)
        .take_while(|(a, b)| a == b)
        .count()
        .min(ids.len().saturating_sub(1));
    if shared < kv.len() {
        if store.truncate(*seq, shared).is_ok() {
            kv.truncate(shared);
        } else {
            store.free(*seq)?;
            *seq = store.create_seq();
            kv.clear();
        }
    }
    Ok(kv.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use longctx_kvstore::{Budgets, KvConfig, Policy, Retention};

    /// A store of two layers, one global and one chunked-local (chunk 4, blocks of 2), the
    /// sequence filled with `tokens` in appends of `steps` tokens.
    fn filled(tag: &str, tokens: &[u32], steps: usize) -> (KvStore, SeqId) {
        let dir = std::env::temp_dir().join(format!("longctx-chat-{tag}-{}", std::process::id()));
        let store = KvStore::new(KvConfig {
            block_tokens: 2,
            h_kv: 1,
            d: 4,
            dtype: longctx_kernels::DType::F32,
            layers: vec![Retention::Full, Retention::ChunkedLocal { chunk: 4 }],
            budgets: Budgets {
                device: 1 << 20,
                host: 0,
                disk: 0,
            },
            policy: Policy::KeepNewest,
            spill_dir: dir,
        })
        .unwrap();
        let seq = store.create_seq();
        for part in tokens.chunks(steps) {
            let kv: Vec<f32> = part.iter().flat_map(|t| [*t as f32; 4]).collect();
            for layer in 0..2 {
                store.append(seq, layer, &kv, &kv).unwrap();
            }
        }
        (store, seq)
    }

    #[test]
    fn the_kv_is_cut_back_to_the_shared_prefix() {
        let history: Vec<u32> = (0..10).collect();
        let (store, mut seq) = filled("cut", &history, 10);
        let mut kv = history.clone();
        // The next turn extends the history: all of it is kept.
        let next: Vec<u32> = (0..14).collect();
        assert_eq!(
            keep_shared_prefix(&store, &mut seq, &mut kv, &next).unwrap(),
            10
        );
        // A rendering that differs at token 6 (an answer tokenised otherwise): cut to 6.
        let other: Vec<u32> = (0..6).chain([99, 100]).collect();
        assert_eq!(
            keep_shared_prefix(&store, &mut seq, &mut kv, &other).unwrap(),
            6
        );
        assert_eq!(store.len(seq, 0).unwrap(), 6);
        assert_eq!(kv, (0..6).collect::<Vec<u32>>());
        // The whole prompt already held: its last token is computed again, for its logits.
        let same: Vec<u32> = (0..6).collect();
        assert_eq!(
            keep_shared_prefix(&store, &mut seq, &mut kv, &same).unwrap(),
            5
        );
        assert_eq!(store.len(seq, 1).unwrap(), 5);
    }

    /// A chunked-local layer has let go of the blocks before the last append's chunk: a cut
    /// before them starts over rather than failing the turn.
    #[test]
    fn a_cut_into_retired_blocks_starts_a_fresh_sequence() {
        let history: Vec<u32> = (0..10).collect();
        let (store, mut seq) = filled("retired", &history, 4);
        assert!(store.held_from(seq, 1).unwrap() > 2);
        let first = seq;
        let mut kv = history.clone();
        let other: Vec<u32> = (0..2).chain([99]).collect();
        assert_eq!(
            keep_shared_prefix(&store, &mut seq, &mut kv, &other).unwrap(),
            0
        );
        assert!(kv.is_empty() && seq != first);
        assert_eq!(store.len(seq, 0).unwrap(), 0);
        assert_eq!(
            store.usage().bytes.iter().sum::<u64>(),
            0,
            "the old blocks are freed"
        );
    }
}
