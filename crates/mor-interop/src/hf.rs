//! Hugging Face `LlamaForCausalLM` folders: `config.json` plus `model.safetensors` (or
//! `model.safetensors.index.json` with shards). Tensor dtypes F32, F16 and BF16 are read (and
//! widened to f32); names are already mor's.
//!
//! `config.json` fields used: `model_type` (`llama`), `hidden_size`, `intermediate_size`,
//! `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads` (default: heads),
//! `head_dim` (default: hidden / heads), `rms_norm_eps`, `rope_theta` (default 10000),
//! `max_position_embeddings` (default 2048), `tie_word_embeddings` (default false, as
//! `LlamaConfig`), `vocab_size`, `rope_parameters` (transformers 5: `rope_type` must be
//! `default`; its `rope_theta` wins). Refused with the field named: `rope_scaling`, biases
//! (`attention_bias`, `mlp_bias`), activations other than SiLU, `partial_rotary_factor` ≠ 1.

use crate::{clean_f32, Imported, Tensor, Tensors};
use anyhow::{bail, ensure, Context, Result};
use mor_config::ModelConfig;
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn field<'a>(cfg: &'a Value, key: &str) -> Option<&'a Value> {
    cfg.get(key).filter(|v| !v.is_null())
}

fn req_usize(cfg: &Value, key: &str) -> Result<usize> {
    let v = field(cfg, key).with_context(|| format!("config.json: field {key} is missing"))?;
    let n = v.as_u64().with_context(|| format!("config.json: field {key} is not a non-negative integer ({v})"))?;
    ensure!(n > 0, "config.json: field {key} must be > 0");
    Ok(n as usize)
}

fn opt_usize(cfg: &Value, key: &str) -> Result<Option<usize>> {
    field(cfg, key)
        .map(|v| v.as_u64().map(|n| n as usize).with_context(|| format!("config.json: field {key} is not a non-negative integer ({v})")))
        .transpose()
}

fn opt_f64(cfg: &Value, key: &str) -> Result<Option<f64>> {
    field(cfg, key).map(|v| v.as_f64().with_context(|| format!("config.json: field {key} is not a number ({v})"))).transpose()
}

fn opt_bool(cfg: &Value, key: &str) -> Result<Option<bool>> {
    field(cfg, key).map(|v| v.as_bool().with_context(|| format!("config.json: field {key} is not a boolean ({v})"))).transpose()
}

/// The model configuration of a Hugging Face Llama `config.json`.
pub fn hf_config(cfg: &Value) -> Result<ModelConfig> {
    let mt = field(cfg, "model_type").and_then(Value::as_str).unwrap_or("");
    let arch_llama = cfg
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("LlamaForCausalLM")));
    ensure!(
        mt == "llama" || (mt.is_empty() && arch_llama),
        "config.json: field model_type is {mt:?}: only \"llama\" (LlamaForCausalLM) models can be imported"
    );
    if let Some(rs) = field(cfg, "rope_scaling") {
        bail!("config.json: field rope_scaling is set ({rs}): RoPE scaling is not supported");
    }
    // transformers >= 5 writes `rope_parameters` ({rope_type, rope_theta}) instead.
    let mut theta = opt_f64(cfg, "rope_theta")?;
    if let Some(rp) = field(cfg, "rope_parameters") {
        let ty = rp.get("rope_type").and_then(Value::as_str).unwrap_or("default");
        ensure!(ty == "default", "config.json: field rope_parameters.rope_type is {ty:?}: RoPE scaling is not supported");
        if let Some(t) = rp.get("rope_theta").filter(|v| !v.is_null()) {
            theta = Some(t.as_f64().with_context(|| format!("config.json: field rope_parameters.rope_theta is not a number ({t})"))?);
        }
    }
    for key in ["attention_bias", "mlp_bias"] {
        ensure!(!opt_bool(cfg, key)?.unwrap_or(false), "config.json: field {key} is true: biases are not supported");
    }
    if let Some(act) = field(cfg, "hidden_act") {
        ensure!(act.as_str() == Some("silu"), "config.json: field hidden_act is {act}: only \"silu\" is supported");
    }
    if let Some(p) = opt_f64(cfg, "partial_rotary_factor")? {
        ensure!(p == 1.0, "config.json: field partial_rotary_factor is {p}: partial rotary embeddings are not supported");
    }
    let d = req_usize(cfg, "hidden_size")?;
    let heads = req_usize(cfg, "num_attention_heads")?;
    let kv = opt_usize(cfg, "num_key_value_heads")?.unwrap_or(heads);
    let head_dim = opt_usize(cfg, "head_dim")?.unwrap_or(d / heads);
    let c = ModelConfig {
        vocab_size: req_usize(cfg, "vocab_size")?,
        hidden_size: d,
        num_layers: req_usize(cfg, "num_hidden_layers")?,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        intermediate_size: req_usize(cfg, "intermediate_size")?,
        rms_norm_eps: opt_f64(cfg, "rms_norm_eps")?.context("config.json: field rms_norm_eps is missing")?,
        rope_theta: clean_f32(theta.unwrap_or(10000.0)),
        max_seq_len: opt_usize(cfg, "max_position_embeddings")?.unwrap_or(2048),
        tie_embeddings: opt_bool(cfg, "tie_word_embeddings")?.unwrap_or(false),
        init_std: opt_f64(cfg, "initializer_range")?.unwrap_or(0.02),
        recursion: None,
        router: None,
    };
    c.validate().context("config.json describes an invalid model")?;
    Ok(c)
}

/// The safetensors files of a folder: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .with_context(|| format!("{}: field weight_map is missing", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
}

/// Every tensor of a safetensors file widened to f32. Corrupt headers, unsupported dtypes and
/// truncated data are errors naming the file (and the tensor).
pub fn read_safetensors(path: &Path) -> Result<Tensors> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: read-only map of a file we do not modify.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("memory-mapping {}", path.display()))?;
    let st = SafeTensors::deserialize(&map).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e:?}", path.display()))?;
    let mut out = Tensors::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F64 => raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            other => bail!("{}: tensor {name} has dtype {other:?}; only F32, F16, BF16 and F64 are supported", path.display()),
        };
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            bail!("{}: tensor {name} holds a non-finite value at element {i}", path.display());
        }
        out.insert(name, Tensor::new(view.shape().to_vec(), data));
    }
    Ok(out)
}

/// Read a Hugging Face Llama folder.
pub fn read_hf(dir: &Path) -> Result<Imported> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let raw: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
    let config = hf_config(&raw).with_context(|| format!("importing {}", dir.display()))?;
    let mut tensors = Tensors::new();
    for f in weight_files(dir)? {
        for (k, v) in read_safetensors(&f)? {
            ensure!(!tensors.contains_key(&k), "tensor {k} appears in more than one shard");
            tensors.insert(k, v);
        }
    }
    // Non-parameters some checkpoints carry, and the duplicate head of tied models.
    tensors.retain(|k, _| !k.ends_with(".rotary_emb.inv_freq"));
    if config.tie_embeddings {
        tensors.remove("lm_head.weight");
    }
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() { Some(mor_data::Tokenizer::from_file(&tok_path)?) } else { None };
    let eos = match field(&raw, "eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|v| v as u32),
        Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|v| v as u32),
        _ => None,
    };
    Ok(Imported { config, tensors, tokenizer, eos, source: format!("Hugging Face folder {}", dir.display()) })
}
