//! Llama-architecture GGUF → mor tensors and config.
//!
//! Name map (llama.cpp → Hugging Face / mor):
//!
//! | GGUF | mor |
//! |---|---|
//! | `token_embd.weight` | `model.embed_tokens.weight` |
//! | `output_norm.weight` | `model.norm.weight` |
//! | `output.weight` (absent: tied) | `lm_head.weight` |
//! | `blk.{i}.attn_norm.weight` | `model.layers.{i}.input_layernorm.weight` |
//! | `blk.{i}.attn_{q,k}.weight` (permuted) | `model.layers.{i}.self_attn.{q,k}_proj.weight` |
//! | `blk.{i}.attn_v.weight`, `attn_output.weight` | `…self_attn.v_proj.weight`, `…o_proj.weight` |
//! | `blk.{i}.ffn_norm.weight` | `model.layers.{i}.post_attention_layernorm.weight` |
//! | `blk.{i}.ffn_{gate,up,down}.weight` | `model.layers.{i}.mlp.{gate,up,down}_proj.weight` |
//!
//! Config from metadata: `llama.block_count`, `llama.embedding_length`,
//! `llama.feed_forward_length`, `llama.attention.head_count`, `llama.attention.head_count_kv`
//! (default: head_count), `llama.attention.key_length` (default: d / heads),
//! `llama.rope.freq_base` (default 10000), `llama.attention.layer_norm_rms_epsilon`,
//! `llama.context_length`, `llama.vocab_size` (default: the embedding's rows). Refused, with the
//! field named: other architectures, RoPE scaling, partial rotary dimensions, MoE layers.

use crate::{clean_f32, Imported, Tensor, Tensors};
use anyhow::{bail, ensure, Context, Result};
use mor_config::ModelConfig;
use mor_gguf::GgufFile;
use std::path::Path;

/// Undo llama.cpp's Q/K permutation for one projection of `heads` heads of `head_dim` rows
/// each (`cols` inputs per row). llama.cpp's converter maps Hugging Face row
/// `h*hd + j*(hd/2) + i` to GGUF row `h*hd + 2*i + j` (RoPE pairs made adjacent).
pub fn unpermute_rows(w: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    assert_eq!(w.len(), heads * head_dim * cols);
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let dst = h * head_dim + j * half + i;
                let src = h * head_dim + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The inverse of [`unpermute_rows`] (Hugging Face layout → llama.cpp layout).
pub fn permute_rows(w: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + j * half + i;
                let gg = h * head_dim + 2 * i + j;
                out[gg * cols..(gg + 1) * cols].copy_from_slice(&w[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

fn req_int(g: &GgufFile, key: &str) -> Result<usize> {
    let v = g.get(key).with_context(|| format!("GGUF metadata field {key} is missing"))?;
    let n = v.as_i64().with_context(|| format!("GGUF metadata field {key} is not an integer ({v})"))?;
    ensure!(n > 0, "GGUF metadata field {key} must be > 0 (got {n})");
    Ok(n as usize)
}

fn opt_int(g: &GgufFile, key: &str) -> Result<Option<usize>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => {
            let n = v.as_i64().with_context(|| format!("GGUF metadata field {key} is not an integer ({v})"))?;
            ensure!(n >= 0, "GGUF metadata field {key} must be >= 0 (got {n})");
            Ok(Some(n as usize))
        }
    }
}

fn opt_float(g: &GgufFile, key: &str) -> Result<Option<f64>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => Ok(Some(v.as_f64().with_context(|| format!("GGUF metadata field {key} is not a number ({v})"))?)),
    }
}

/// The model configuration a Llama GGUF file describes.
pub fn gguf_config(g: &GgufFile) -> Result<ModelConfig> {
    let arch = g
        .get("general.architecture")
        .context("GGUF metadata field general.architecture is missing")?
        .as_str()
        .context("GGUF metadata field general.architecture is not a string")?;
    ensure!(
        arch == "llama",
        "GGUF metadata field general.architecture is {arch:?}: only \"llama\" models can be imported"
    );
    let k = |s: &str| format!("llama.{s}");
    let layers = req_int(g, &k("block_count"))?;
    let d = req_int(g, &k("embedding_length"))?;
    let ffn = req_int(g, &k("feed_forward_length"))?;
    let heads = req_int(g, &k("attention.head_count"))?;
    let kv_heads = opt_int(g, &k("attention.head_count_kv"))?.unwrap_or(heads);
    ensure!(kv_heads > 0, "GGUF metadata field llama.attention.head_count_kv must be > 0");
    ensure!(d % heads == 0 || g.get(&k("attention.key_length")).is_some(), "GGUF metadata field llama.attention.head_count ({heads}) does not divide llama.embedding_length ({d})");
    let head_dim = opt_int(g, &k("attention.key_length"))?.unwrap_or(d / heads);
    if let Some(vl) = opt_int(g, &k("attention.value_length"))? {
        ensure!(vl == head_dim, "GGUF metadata field llama.attention.value_length ({vl}) differs from the key length ({head_dim}): unsupported");
    }
    if let Some(rd) = opt_int(g, &k("rope.dimension_count"))? {
        ensure!(rd == head_dim, "GGUF metadata field llama.rope.dimension_count is {rd}, not the head dimension {head_dim}: partial rotary embeddings are not supported");
    }
    if let Some(v) = g.get(&k("rope.scaling.type")) {
        let s = v.as_str().unwrap_or("?");
        ensure!(s == "none", "GGUF metadata field llama.rope.scaling.type is {s:?}: RoPE scaling is not supported");
    }
    if let Some(f) = opt_float(g, &k("rope.scaling.factor"))? {
        ensure!(f == 0.0 || f == 1.0, "GGUF metadata field llama.rope.scaling.factor is {f}: RoPE scaling is not supported");
    }
    if let Some(n) = opt_int(g, &k("expert_count"))? {
        ensure!(n == 0, "GGUF metadata field llama.expert_count is {n}: mixture-of-experts layers are not supported");
    }
    let theta = opt_float(g, &k("rope.freq_base"))?.unwrap_or(10000.0);
    let eps = opt_float(g, &k("attention.layer_norm_rms_epsilon"))?
        .context("GGUF metadata field llama.attention.layer_norm_rms_epsilon is missing")?;
    let ctx = opt_int(g, &k("context_length"))?.unwrap_or(2048);
    let embd = g.tensor("token_embd.weight").context("GGUF tensor token_embd.weight is missing")?;
    let vocab_rows = embd.shape_row_major()[0];
    let vocab = opt_int(g, &k("vocab_size"))?.unwrap_or(vocab_rows);
    ensure!(
        vocab == vocab_rows,
        "GGUF metadata field llama.vocab_size is {vocab} but tensor token_embd.weight has {vocab_rows} rows"
    );
    let cfg = ModelConfig {
        vocab_size: vocab,
        hidden_size: d,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        intermediate_size: ffn,
        rms_norm_eps: clean_f32(eps),
        rope_theta: clean_f32(theta),
        max_seq_len: ctx,
        tie_embeddings: g.tensor("output.weight").is_none(),
        init_std: 0.02,
        recursion: None,
        router: None,
    };
    cfg.validate().context("the GGUF metadata describes an invalid model")?;
    Ok(cfg)
}

/// Read a Llama GGUF file: config, HF-layout f32 tensors, tokenizer.
pub fn read_gguf(path: &Path) -> Result<Imported> {
    let g = GgufFile::open(path)?;
    let cfg = gguf_config(&g).with_context(|| format!("importing {}", path.display()))?;
    let tensors = gguf_tensors(&g, &cfg).with_context(|| format!("importing {}", path.display()))?;
    let tokenizer = match g.get("tokenizer.ggml.model") {
        Some(_) => Some(mor_data::Tokenizer::from_gguf(&g)?),
        None => None,
    };
    if let Some(t) = &tokenizer {
        ensure!(
            t.vocab_size() <= cfg.vocab_size,
            "{}: the tokenizer has {} ids but the model only {} embedding rows",
            path.display(),
            t.vocab_size(),
            cfg.vocab_size
        );
    }
    let eos = g.get_i64("tokenizer.ggml.eos_token_id").map(|v| v as u32);
    Ok(Imported {
        config: cfg,
        tensors,
        tokenizer,
        eos,
        source: format!("GGUF {}", path.display()),
    })
}

/// Dequantise and rename every tensor of the file, checking shapes against `cfg`.
pub fn gguf_tensors(g: &GgufFile, cfg: &ModelConfig) -> Result<Tensors> {
    let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let mut plan: Vec<(String, String, Vec<usize>, Option<usize>)> = vec![
        ("token_embd.weight".into(), "model.embed_tokens.weight".into(), vec![cfg.vocab_size, d], None),
        ("output_norm.weight".into(), "model.norm.weight".into(), vec![d], None),
    ];
    if !cfg.tie_embeddings {
        plan.push(("output.weight".into(), "lm_head.weight".into(), vec![cfg.vocab_size, d], None));
    }
    for l in 0..cfg.num_layers {
        let (b, m) = (format!("blk.{l}."), format!("model.layers.{l}."));
        let rows: [(&str, &str, Vec<usize>, Option<usize>); 9] = [
            ("attn_norm", "input_layernorm", vec![d], None),
            ("attn_q", "self_attn.q_proj", vec![qd, d], Some(cfg.num_heads)),
            ("attn_k", "self_attn.k_proj", vec![kvd, d], Some(cfg.num_kv_heads)),
            ("attn_v", "self_attn.v_proj", vec![kvd, d], None),
            ("attn_output", "self_attn.o_proj", vec![d, qd], None),
            ("ffn_norm", "post_attention_layernorm", vec![d], None),
            ("ffn_gate", "mlp.gate_proj", vec![f, d], None),
            ("ffn_up", "mlp.up_proj", vec![f, d], None),
            ("ffn_down", "mlp.down_proj", vec![d, f], None),
        ];
        for (gn, mn, shape, perm) in rows {
            plan.push((format!("{b}{gn}.weight"), format!("{m}{mn}.weight"), shape, perm));
        }
    }
    let known: std::collections::HashSet<&str> = plan.iter().map(|p| p.0.as_str()).collect();
    for t in &g.tensors {
        if !known.contains(t.name.as_str()) {
            if t.name == "rope_freqs.weight" {
                bail!("GGUF tensor rope_freqs.weight (Llama-3 RoPE frequency scaling) is not supported");
            }
            if t.name == "output.weight" {
                continue; // tied config never plans it; cannot happen, kept for clarity
            }
            bail!("GGUF tensor {} is not part of a Llama model of this config (unexpected tensor)", t.name);
        }
    }
    let mut out = Tensors::new();
    for (gname, name, shape, perm) in plan {
        let info = g.tensor(&gname).with_context(|| format!("GGUF tensor {gname} is missing"))?;
        let got = info.shape_row_major();
        ensure!(
            got == shape,
            "GGUF tensor {gname} has shape {got:?} (row-major), expected {shape:?} from the metadata"
        );
        let mut data = g.dequantize(&gname)?;
        if let Some(heads) = perm {
            data = unpermute_rows(&data, heads, hd, d);
        }
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            bail!("GGUF tensor {gname} holds a non-finite value at element {i}: corrupt file?");
        }
        out.insert(name, Tensor::new(shape, data));
    }
    Ok(out)
}
