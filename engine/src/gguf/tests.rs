//! GGUF parser tests: files written here, then truncated and corrupted at random.

use super::*;
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Writes a GGUF v3 file: metadata (key, type id, raw value bytes) and tensors.
pub(crate) fn write_gguf(
    meta: &[(&str, u32, Vec<u8>)],
    tensors: &[(&str, Vec<u64>, u32, Vec<u8>)],
) -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, t, v) in meta {
        s(&mut b, k);
        b.extend(t.to_le_bytes());
        b.extend(v);
    }
    let mut offset = 0u64;
    let mut offsets = vec![];
    for (name, dims, ty, data) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    let base = b.len();
    for ((_, _, _, data), off) in tensors.iter().zip(offsets) {
        b.resize(base + off as usize, 0);
        b.extend(data);
    }
    b
}

pub(crate) fn str_value(x: &str) -> Vec<u8> {
    let mut v = (x.len() as u64).to_le_bytes().to_vec();
    v.extend(x.as_bytes());
    v
}

fn sample_file(rng: &mut StdRng) -> (Vec<u8>, Vec<f32>, Vec<f32>, Vec<f32>) {
    // f32 [3, 2]
    let a: Vec<f32> = (0..6).map(|_| rng.random_range(-1.0..1.0)).collect();
    let a_bytes: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
    // Q8_0, one block of 32.
    let d = f16::from_f32(0.125);
    let qs: Vec<i8> = (0..32).map(|_| rng.random_range(-127..=127)).collect();
    let mut q8 = d.to_le_bytes().to_vec();
    q8.extend(qs.iter().map(|q| *q as u8));
    let want_q8: Vec<f32> = qs.iter().map(|q| d.to_f32() * *q as f32).collect();
    // Q4_1, one block of 32.
    let (d, m) = (f16::from_f32(0.5), f16::from_f32(-2.0));
    let nib: Vec<u8> = (0..16).map(|_| rng.random()).collect();
    let mut q4 = d.to_le_bytes().to_vec();
    q4.extend(m.to_le_bytes());
    q4.extend(&nib);
    let mut want_q4 = vec![0f32; 32];
    for (j, q) in nib.iter().enumerate() {
        want_q4[j] = 0.5 * (q & 15) as f32 - 2.0;
        want_q4[j + 16] = 0.5 * (q >> 4) as f32 - 2.0;
    }
    let mut tokens = 9u32.to_le_bytes().to_vec(); // array of strings
    tokens.extend(8u32.to_le_bytes());
    tokens.extend(2u64.to_le_bytes());
    tokens.extend(str_value("a"));
    tokens.extend(str_value("b"));
    let file = write_gguf(
        &[
            ("general.architecture", 8, str_value("llama")),
            ("llama.block_count", 4, 2u32.to_le_bytes().to_vec()),
            ("tokenizer.ggml.tokens", 9, tokens[4..].to_vec()),
        ],
        &[
            ("a", vec![3, 2], 0, a_bytes),
            ("q8", vec![32], 8, q8),
            ("q4", vec![32], 3, q4),
        ],
    );
    (file, a, want_q8, want_q4)
}

fn parse_file(bytes: &[u8]) -> Result<Gguf> {
    let dir = std::env::temp_dir().join(format!(
        "longctx-gguf-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::write(&dir, bytes).unwrap();
    let r = Gguf::open(&dir);
    let _ = std::fs::remove_file(&dir);
    r
}

#[test]
fn a_written_file_reads_back_with_every_type_dequantised() {
    let mut rng = StdRng::seed_from_u64(rand::random());
    let (file, a, q8, q4) = sample_file(&mut rng);
    let g = parse_file(&file).unwrap();
    assert_eq!(
        g.get("general.architecture").unwrap().as_str(),
        Some("llama")
    );
    assert_eq!(g.get("llama.block_count").unwrap().as_u64(), Some(2));
    assert_eq!(
        g.get("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(g.tensors["a"].dims, vec![3, 2]);
    assert_eq!(g.tensor_f32("a").unwrap(), a);
    assert_eq!(g.tensor_f32("q8").unwrap(), q8);
    assert_eq!(g.tensor_f32("q4").unwrap(), q4);
    assert!(matches!(
        g.tensor_f32("nope"),
        Err(EngineError::Weight { .. })
    ));
}

#[test]
fn every_truncation_is_an_error_never_a_panic() {
    let mut rng = StdRng::seed_from_u64(rand::random());
    let (file, ..) = sample_file(&mut rng);
    // The last byte any tensor needs; past it only the alignment padding is cut.
    let (_, _, tensors) = Gguf::parse_bytes(&file).unwrap();
    let need = tensors.values().map(|t| t.start + t.bytes).max().unwrap() as usize;
    assert!(
        need > file.len() - 32 && need <= file.len(),
        "need {need} of {}",
        file.len()
    );
    for cut in 0..=file.len() {
        let r = parse_header(&file[..cut]);
        if cut < need {
            assert!(r.is_err(), "a file cut at {cut} of {} parsed", file.len());
        } else {
            assert!(r.is_ok(), "a file cut at {cut} (>= {need}) failed: {r:?}");
        }
    }
}

#[test]
fn corrupted_bytes_never_panic_and_lengths_are_capped() {
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (file, ..) = sample_file(&mut rng);
    for _ in 0..3000 {
        let mut f = file.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..f.len());
            f[i] = rng.random();
        }
        let _ = parse_header(&f);
    }
    // A string length of 2^60 and a tensor far past the end: clear errors.
    let mut f = file.clone();
    f[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(parse_header(&f).unwrap_err().contains("length"));
    let huge = write_gguf(&[], &[("t", vec![1 << 40, 1 << 40], 0, vec![0; 8])]);
    assert!(parse_header(&huge).is_err());
    let past = write_gguf(&[], &[("t", vec![1000], 0, vec![0; 8])]);
    let e = parse_header(&past).unwrap_err();
    assert!(e.contains("outside the file"), "{e}");
    assert!(matches!(
        parse_file(b"GGUF\x07\0\0\0"),
        Err(EngineError::BadFile { .. })
    ));
}

/// A llama GGUF's metadata with one key replaced: (key, GGUF type id, raw value).
fn llama_meta(over: (&str, u32, Vec<u8>)) -> Vec<u8> {
    let u32v = |x: u32| x.to_le_bytes().to_vec();
    let mut meta: Vec<(&str, u32, Vec<u8>)> = vec![
        ("general.architecture", 8, str_value("llama")),
        ("llama.embedding_length", 4, u32v(64)),
        ("llama.attention.head_count", 4, u32v(4)),
        ("llama.attention.head_count_kv", 4, u32v(2)),
        ("llama.block_count", 4, u32v(2)),
        ("llama.feed_forward_length", 4, u32v(128)),
        ("llama.vocab_size", 4, u32v(300)),
        ("llama.rope.freq_base", 6, 10000f32.to_le_bytes().to_vec()),
        (
            "llama.attention.layer_norm_rms_epsilon",
            6,
            1e-5f32.to_le_bytes().to_vec(),
        ),
    ];
    match meta.iter_mut().find(|m| m.0 == over.0) {
        Some(m) => *m = over,
        None => meta.push(over),
    }
    write_gguf(&meta, &[])
}

/// Header fields that once panicked, aborted or ran with garbage: each a clear error.
#[test]
fn bad_llama_metadata_is_a_config_error() {
    let g = parse_file(&llama_meta((
        "llama.block_count",
        4,
        2u32.to_le_bytes().to_vec(),
    )));
    crate::ModelConfig::from_gguf(&g.unwrap()).unwrap();
    for (key, ty, val, needle) in [
        (
            "llama.rope.dimension_count",
            4u32,
            0u32.to_le_bytes().to_vec(),
            "rotary dim",
        ),
        (
            "llama.block_count",
            4,
            4_000_000_000u32.to_le_bytes().to_vec(),
            "layers",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            6,
            f32::NAN.to_le_bytes().to_vec(),
            "rms_norm_eps",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            6,
            (-1f32).to_le_bytes().to_vec(),
            "rms_norm_eps",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            6,
            f32::INFINITY.to_le_bytes().to_vec(),
            "rms_norm_eps",
        ),
    ] {
        let g = parse_file(&llama_meta((key, ty, val))).unwrap();
        let e = crate::ModelConfig::from_gguf(&g).unwrap_err();
        assert!(e.to_string().contains(needle), "{key}: {e}");
    }
}

/// A tensor whose offset points into another's bytes is refused.
#[test]
fn overlapping_tensors_are_refused() {
    let data = |n: usize| vec![7u8; n];
    let file = write_gguf(
        &[("general.architecture", 8, str_value("llama"))],
        &[("a", vec![16], 0, data(64)), ("b", vec![16], 0, data(64))],
    );
    assert!(Gguf::parse_bytes(&file).is_ok());
    // b's offset (its 8 bytes after the name, dims and type) moved from 64 into a's bytes.
    let mut bad = file.clone();
    let at = bad
        .windows(1 + 8)
        .rposition(|w| w[0] == b'b')
        .expect("b's name")
        + 1;
    let (n_dims, dims, ty) = (4, 8, 4);
    let off = at + n_dims + dims + ty;
    assert_eq!(
        u64::from_le_bytes(bad[off..off + 8].try_into().unwrap()),
        64
    );
    bad[off..off + 8].copy_from_slice(&32u64.to_le_bytes());
    let e = Gguf::parse_bytes(&bad).unwrap_err();
    assert!(e.contains("overlap"), "{e}");
}

/// A tensor type this build does not read is named as llama.cpp names it, not only by its
/// number; the k-quants a Q4_K_M file holds are read.
#[test]
fn unread_types_are_named_and_k_quants_read() {
    assert_eq!(GgmlType::name_of(12), "Q4_K");
    assert_eq!(GgmlType::name_of(16), "IQ2_XXS");
    assert_eq!(GgmlType::name_of(30), "BF16");
    assert_eq!(GgmlType::name_of(99), "unknown type 99");
    // IQ2_XXS's data length is not known to the parser (no block size): its range is empty.
    let mut q4k = vec![0u8; 144];
    q4k[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes()); // d
    q4k[4] = 3; // scale of sub-block 0
    q4k[16] = 0x21; // elements 0 (1) and 32 (2)
    let file = write_gguf(
        &[("general.architecture", 8, str_value("llama"))],
        &[
            ("blk.0.ffn_down.weight", vec![256], 16, vec![]),
            ("blk.0.ffn_up.weight", vec![256], 12, q4k),
        ],
    );
    let g = parse_file(&file).unwrap();
    let e = g
        .tensor_f32("blk.0.ffn_down.weight")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is IQ2_XXS, which this build does not read"),
        "{e}"
    );
    assert!(!e.contains("type 16"), "named, not numbered: {e}");
    assert!(e.contains("Q4_K, Q5_K, Q6_K"), "{e}");
    let v = g.tensor_f32("blk.0.ffn_up.weight").unwrap();
    assert_eq!((v[0], v[1], v[32]), (1.5, 0.0, 0.0));
}

/// A Llama 4 GGUF laid out as `convert_hf_to_gguf.py` writes one (architecture `llama4`,
/// the feed-forward under llama.cpp's names, experts split and transposed, `rope_freqs`)
/// computes the same logits as the same weights by their Hugging Face names.
#[test]
fn a_llama4_gguf_runs_as_its_hugging_face_weights() {
    use crate::config::ModelConfig;
    use crate::model::{KvOptions, Logits, Model};
    use crate::weights::Weights;
    let u32v = |x: u32| x.to_le_bytes().to_vec();
    let f32v = |x: f32| x.to_le_bytes().to_vec();
    let meta: Vec<(&str, u32, Vec<u8>)> = vec![
        ("general.architecture", 8, str_value("llama4")),
        ("llama4.embedding_length", 4, u32v(32)),
        ("llama4.block_count", 4, u32v(4)),
        ("llama4.feed_forward_length", 4, u32v(48)),
        ("llama4.expert_feed_forward_length", 4, u32v(16)),
        ("llama4.expert_count", 4, u32v(4)),
        ("llama4.expert_used_count", 4, u32v(1)),
        ("llama4.interleave_moe_layer_step", 4, u32v(2)),
        ("llama4.attention.head_count", 4, u32v(4)),
        ("llama4.attention.head_count_kv", 4, u32v(2)),
        ("llama4.rope.dimension_count", 4, u32v(8)),
        ("llama4.rope.freq_base", 6, f32v(500000.0)),
        ("llama4.attention.layer_norm_rms_epsilon", 6, f32v(1e-5)),
        ("llama4.context_length", 4, u32v(256)),
        ("llama4.vocab_size", 4, u32v(64)),
    ];
    let parse_meta = |extra: &[(&str, Vec<u64>, u32, Vec<u8>)]| {
        let file = write_gguf(&meta, extra);
        parse_file(&file).unwrap()
    };
    let cfg = ModelConfig::from_gguf(&parse_meta(&[])).unwrap();
    let m = cfg.moe.clone().unwrap();
    assert_eq!(
        (m.experts, m.intermediate, m.layers),
        (4, 16, vec![false, true, false, true])
    );
    let l4 = cfg.llama4.clone().unwrap();
    assert_eq!(l4.rope_layers, vec![true, true, true, false]);
    assert!(l4.qk_norm && l4.temperature_tuning);
    let hf = crate::random::random_tensors(&cfg, 11);
    // The GGUF: every tensor under llama.cpp's name, dims innermost first.
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let dims = |s: &[usize]| s.iter().rev().map(|d| *d as u64).collect::<Vec<u64>>();
    let mut names: Vec<(String, Vec<u64>, Vec<u8>)> = vec![];
    // Factors of 1 and 4 on the 4 rotated pairs: they must reach the RoPE.
    let factors = [1.0f32, 1.0, 4.0, 4.0];
    names.push(("rope_freqs.weight".into(), vec![4], bytes(&factors)));
    for (name, t) in &hf {
        let v = t.to_f32().unwrap();
        let g = match name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".into(),
            "lm_head.weight" => "output.weight".into(),
            n => {
                let rest = n.strip_prefix("model.layers.").unwrap();
                let (l, what) = rest.split_once('.').unwrap();
                let (e, h, i) = (4, 32, 16);
                if what == "feed_forward.experts.gate_up_proj" {
                    // [E, h, 2I] -> gate and up, each [E, I, h].
                    let (mut gate, mut up) = (vec![0f32; e * i * h], vec![0f32; e * i * h]);
                    for x in 0..e {
                        for r in 0..h {
                            for j in 0..i {
                                gate[(x * i + j) * h + r] = v[(x * h + r) * 2 * i + j];
                                up[(x * i + j) * h + r] = v[(x * h + r) * 2 * i + i + j];
                            }
                        }
                    }
                    names.push((
                        format!("blk.{l}.ffn_gate_exps.weight"),
                        dims(&[e, i, h]),
                        bytes(&gate),
                    ));
                    names.push((
                        format!("blk.{l}.ffn_up_exps.weight"),
                        dims(&[e, i, h]),
                        bytes(&up),
                    ));
                    continue;
                }
                if what == "feed_forward.experts.down_proj" {
                    // [E, I, h] -> [E, h, I].
                    let mut down = vec![0f32; e * h * i];
                    for x in 0..e {
                        for j in 0..i {
                            for r in 0..h {
                                down[(x * h + r) * i + j] = v[(x * i + j) * h + r];
                            }
                        }
                    }
                    names.push((
                        format!("blk.{l}.ffn_down_exps.weight"),
                        dims(&[e, h, i]),
                        bytes(&down),
                    ));
                    continue;
                }
                let g = match what {
                    "input_layernorm.weight" => "attn_norm",
                    "post_attention_layernorm.weight" => "ffn_norm",
                    "self_attn.q_proj.weight" => "attn_q",
                    "self_attn.k_proj.weight" => "attn_k",
                    "self_attn.v_proj.weight" => "attn_v",
                    "self_attn.o_proj.weight" => "attn_output",
                    "feed_forward.router.weight" => "ffn_gate_inp",
                    "feed_forward.gate_proj.weight" => "ffn_gate",
                    "feed_forward.up_proj.weight" => "ffn_up",
                    "feed_forward.down_proj.weight" => "ffn_down",
                    "feed_forward.shared_expert.gate_proj.weight" => "ffn_gate_shexp",
                    "feed_forward.shared_expert.up_proj.weight" => "ffn_up_shexp",
                    "feed_forward.shared_expert.down_proj.weight" => "ffn_down_shexp",
                    w => panic!("no GGUF name for {w}"),
                };
                format!("blk.{l}.{g}.weight")
            }
        };
        names.push((g, dims(&t.shape), bytes(&v)));
    }
    let tensors: Vec<(&str, Vec<u64>, u32, Vec<u8>)> = names
        .iter()
        .map(|(n, d, b)| (n.as_str(), d.clone(), 0u32, b.clone()))
        .collect();
    let g = parse_meta(&tensors);
    let gcfg = ModelConfig::from_gguf(&g).unwrap();
    let from_gguf = Model::new(gcfg.clone(), Weights::from_gguf(&g).unwrap()).unwrap();
    // The reference: the same weights by Hugging Face names, RoPE scaled by the factors.
    assert_ne!(gcfg.rope.inv_freq(1), cfg.rope.inv_freq(1));
    let from_hf = Model::new(gcfg.clone(), Weights::from_map(hf)).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 64).collect();
    let run = |m: &Model| {
        let store = m.kv_store(&KvOptions::default()).unwrap();
        let seq = store.create_seq();
        m.forward(&tokens, 0, &store, seq, Logits::All, None, 0)
            .unwrap()
    };
    let (a, b) = (run(&from_gguf), run(&from_hf));
    assert_eq!(a.len(), 40 * 64);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }
    // Without the factors the logits differ: the test sees the RoPE.
    let mut pcfg = gcfg;
    pcfg.rope = cfg.rope;
    let plain = Model::new(pcfg, Weights::from_gguf(&g).unwrap()).unwrap();
    let c = run(&plain);
    assert!(a.iter().zip(&c).any(|(x, y)| (x - y).abs() > 1e-3));
}

/// Every block format's fast path (its blocks times int8 activations) through a whole
/// forward pass: a random Llama whose every linear weight is random blocks of the format
/// (scales set so weights stay ~0.1) gives logits within int8 rounding of the exact path
/// (the same blocks dequantised to f32). A format whose product read its blocks wrong
/// (a level table, a sub-block's scale or minimum, a fifth bit) is off by O(1).
#[test]
fn every_block_format_runs_the_fast_path_near_the_exact_path() {
    use crate::config::ModelConfig;
    use crate::model::{KvOptions, Logits, Model};
    use crate::weights::Weights;
    use longctx_kernels::Format;
    let (hidden, ff, vocab, kv) = (256usize, 512usize, 64usize, 128usize);
    let u32v = |x: u32| x.to_le_bytes().to_vec();
    let meta: Vec<(&str, u32, Vec<u8>)> = vec![
        ("general.architecture", 8, str_value("llama")),
        ("llama.embedding_length", 4, u32v(hidden as u32)),
        ("llama.attention.head_count", 4, u32v(4)),
        ("llama.attention.head_count_kv", 4, u32v(2)),
        ("llama.block_count", 4, u32v(2)),
        ("llama.feed_forward_length", 4, u32v(ff as u32)),
        ("llama.vocab_size", 4, u32v(vocab as u32)),
        ("llama.rope.freq_base", 6, 10000f32.to_le_bytes().to_vec()),
        (
            "llama.attention.layer_norm_rms_epsilon",
            6,
            1e-5f32.to_le_bytes().to_vec(),
        ),
    ];
    let mut rng = StdRng::seed_from_u64(7);
    for f in longctx_kernels::formats::ALL
        .into_iter()
        .filter(|f| !f.is_float())
    {
        // Where each block's f16 scales lie, and the largest |level| they multiply.
        let (d_at, min_at, levels): (usize, Option<usize>, f32) = match f {
            Format::Q4_0 => (0, None, 8.0),
            Format::Q4_1 => (0, Some(2), 15.0),
            Format::Q5_0 => (0, None, 16.0),
            Format::Q5_1 => (0, Some(2), 31.0),
            Format::Q8_0 | Format::IQ4_NL => (0, None, 127.0),
            Format::Q2_K => (80, Some(82), 45.0),
            Format::Q3_K => (108, None, 128.0),
            Format::Q4_K => (0, Some(2), 945.0),
            Format::Q5_K => (0, Some(2), 1953.0),
            Format::Q6_K => (208, None, 4096.0),
            Format::IQ4_XS => (0, None, 4064.0),
            f => unreachable!("{f} is a float format"),
        };
        let blocks = |rows: usize, cols: usize, rng: &mut StdRng| -> Vec<u8> {
            let n = rows * cols / f.block_elems();
            let mut b: Vec<u8> = (0..n * f.block_bytes()).map(|_| rng.random()).collect();
            for blk in b.chunks_exact_mut(f.block_bytes()) {
                let d = 0.1 / levels * rng.random_range(0.5f32..1.0);
                blk[d_at..d_at + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                if let Some(m) = min_at {
                    // Q4_1 / Q5_1 store the minimum itself; the k-quants its scale.
                    let v = if f.block_elems() == 32 { -0.05 } else { d };
                    blk[m..m + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
            }
            b
        };
        let ones: Vec<u8> = (0..hidden).flat_map(|_| 1f32.to_le_bytes()).collect();
        let embd: Vec<u8> = (0..vocab * hidden)
            .flat_map(|_| rng.random_range(-1f32..1.0).to_le_bytes())
            .collect();
        let id = f.ggml_id();
        let mut tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = vec![
            (
                "token_embd.weight".into(),
                vec![hidden as u64, vocab as u64],
                0,
                embd,
            ),
            (
                "output_norm.weight".into(),
                vec![hidden as u64],
                0,
                ones.clone(),
            ),
            (
                "output.weight".into(),
                vec![hidden as u64, vocab as u64],
                id,
                blocks(vocab, hidden, &mut rng),
            ),
        ];
        for l in 0..2 {
            for (name, rows, cols) in [
                ("attn_q", hidden, hidden),
                ("attn_k", kv, hidden),
                ("attn_v", kv, hidden),
                ("attn_output", hidden, hidden),
                ("ffn_gate", ff, hidden),
                ("ffn_up", ff, hidden),
                ("ffn_down", hidden, ff),
            ] {
                let dims = vec![cols as u64, rows as u64];
                let b = blocks(rows, cols, &mut rng);
                tensors.push((format!("blk.{l}.{name}.weight"), dims, id, b));
            }
            for name in ["attn_norm", "ffn_norm"] {
                let dims = vec![hidden as u64];
                tensors.push((format!("blk.{l}.{name}.weight"), dims, 0, ones.clone()));
            }
        }
        let t: Vec<(&str, Vec<u64>, u32, Vec<u8>)> = tensors
            .iter()
            .map(|(n, d, i, b)| (n.as_str(), d.clone(), *i, b.clone()))
            .collect();
        let file = write_gguf(&meta, &t);
        let g = parse_file(&file).unwrap();
        let cfg = ModelConfig::from_gguf(&g).unwrap();
        let tokens: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % vocab as u32).collect();
        let run = |quant: bool| {
            let mut m = Model::new(cfg.clone(), Weights::from_gguf(&g).unwrap()).unwrap();
            if quant {
                m.enable_quant_decode().unwrap();
            }
            let store = m.kv_store(&KvOptions::default()).unwrap();
            let seq = store.create_seq();
            m.forward(&tokens, 0, &store, seq, Logits::All, None, 0)
                .unwrap()
        };
        let (exact, fast) = (run(false), run(true));
        assert_eq!(exact.len(), tokens.len() * vocab);
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in fast.iter().zip(&exact) {
            num += (*a as f64 - *b as f64).powi(2);
            den += (*b as f64).powi(2);
        }
        let e = (num / den).sqrt();
        eprintln!("{f}: fast path vs exact, relative error {e:.2e}");
        assert!(den > 0.0 && e < 3e-2, "{f}: relative error {e:.2e}");
    }
}
