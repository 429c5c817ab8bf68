//! Passkey retrieval (Mohtashami and Jaggi, "Landmark Attention", 2023): a random 5-digit key
//! hidden at a given depth of filler text of a given length; the model is asked for it and
//! scored by exact match of the digits in its answer.

use crate::tokenizer::Tokenizer;
use crate::Result;

const INTRO: &str = "There is an important piece of information hidden inside a lot of \
irrelevant text. Find it and memorize it. I will quiz you about the important information.\n\n";
const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";

/// The key of cell (length, depth): five digits, from a fixed seed so runs are comparable.
pub fn key_for(length: usize, depth: usize, seed: u64) -> u32 {
    let mut x = (length as u64) ^ ((depth as u64) << 32) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    10000 + (x % 90000) as u32
}

/// The prompt's token ids: about `length` tokens (never more), the key sentence after
/// `depth`% of the filler.
pub fn prompt(tok: &Tokenizer, length: usize, depth: usize, key: u32) -> Result<Vec<u32>> {
    let needle = format!("The pass key is {key}. Remember it. {key} is the pass key. ");
    let build = |n: usize| {
        let at = (n * depth.min(100) + 50) / 100;
        let mut s = String::from(INTRO);
        for i in 0..=n {
            if i == at {
                s.push_str(&needle);
            }
            if i < n {
                s.push_str(FILLER);
            }
        }
        s.push_str(QUESTION);
        s
    };
    let fixed = tok.encode(&build(0))?.len();
    let per = tok.encode(&FILLER.repeat(8))?.len() as f64 / 8.0;
    let mut n = ((length.saturating_sub(fixed)) as f64 / per) as usize;
    loop {
        let ids = tok.encode(&build(n))?;
        if ids.len() <= length || n == 0 {
            return Ok(ids);
        }
        n -= 1 + (ids.len() - length) / (per as usize).max(1);
    }
}

/// Whether an answer names the key.
pub fn correct(answer: &str, key: u32) -> bool {
    let digits: String = answer
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits == key.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_five_digits_and_answers_are_matched_exactly() {
        for l in [1024, 4096] {
            for d in [0, 50, 100] {
                let k = key_for(l, d, 1);
                assert!((10000..100000).contains(&k));
            }
        }
        assert!(correct(" 12345. Remember", 12345));
        assert!(!correct(" 123456", 12345));
        assert!(!correct(" 1234", 12345));
        assert!(!correct(" no key", 12345));
    }
}
