//! Export to a Hugging Face style folder.
//!
//! **Vanilla models** become a standard `LlamaForCausalLM` folder that `transformers` loads
//! with `AutoModelForCausalLM.from_pretrained(dir)`:
//! * `model.safetensors` — every parameter, F32, Hugging Face names (mor's names are HF's);
//!   tied models have no `lm_head.weight` (transformers ties it to the embedding);
//! * `config.json` — `architectures: ["LlamaForCausalLM"]`, `model_type: "llama"`, sizes,
//!   `rms_norm_eps`, `rope_theta`, `tie_word_embeddings`, `max_position_embeddings`, …;
//! * `tokenizer.json` when the model came with a tokenizer.
//!
//! **Plain recursive models** (no router, recursion-wise KV) can instead be *unrolled*
//! ([`unroll`], `mor export --unroll`): every layer position gets its own copy of its parameter
//! set, giving a `LlamaForCausalLM` with identical logits (the sharing is lost).
//!
//! **Recursive and MoR models** have no transformers class; they are written in the *mor
//! layout*, which `mor` itself loads back (`--model DIR`):
//! * `model.safetensors` — every parameter under its mor name (see `mor_model::weights`):
//!   `model.layers.{s}.…` is *parameter set* `s` of the sharing map (not a layer position),
//!   `model.routers.{r}.weight` (or `.fc1/.fc2`) the routers, `model.recursions.{r}.layers.{j}…`
//!   untied attention; F32, metadata `format = pt`;
//! * `config.json` — `architectures: ["MorForCausalLM"]`, `model_type: "mor"`, the Llama size
//!   fields for information, and `mor_model`: mor's full `[model]` config (sharing strategy,
//!   recursions, router, KV mode) plus `mor_router_state` (token-choice loss-free biases, which
//!   inference needs);
//! * `tokenizer.json` when known.

use crate::Tensors;
use anyhow::{Context, Result};
use mor_config::ModelConfig;
use mor_engine::Backend;
use mor_model::Model;
use serde_json::{json, Value};
use std::path::Path;

/// `config.json` of a vanilla model as `LlamaForCausalLM`.
pub fn llama_config_json(cfg: &ModelConfig, bos: Option<u32>, eos: Option<u32>) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": { "rope_type": "default", "rope_theta": cfg.rope_theta },
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": true,
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos,
    })
}

/// Export `model` to `dir` (created if needed; files in it are replaced). Returns the
/// architecture written (`LlamaForCausalLM` or `MorForCausalLM`).
pub fn export<B: Backend>(
    backend: &B,
    model: &Model<B>,
    tokenizer: Option<&mor_data::Tokenizer>,
    eos: Option<u32>,
    dir: &Path,
) -> Result<&'static str> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    mor_train::checkpoint::save_model_weights(&dir.join("model.safetensors"), backend, &model.params)?;
    let cfg = &model.cfg;
    let eos = eos.or_else(|| tokenizer.and_then(|t| t.eot_id()));
    let (arch, config) = if cfg.recursion.is_none() && cfg.router.is_none() {
        ("LlamaForCausalLM", llama_config_json(cfg, None, eos))
    } else {
        let mut v = llama_config_json(cfg, None, eos);
        let o = v.as_object_mut().unwrap();
        o.insert("architectures".into(), json!(["MorForCausalLM"]));
        o.insert("model_type".into(), json!("mor"));
        o.insert("num_hidden_layers".into(), json!(cfg.num_layers));
        o.insert("mor_model".into(), serde_json::to_value(cfg)?);
        o.insert("mor_router_state".into(), serde_json::to_value(&model.router_state)?);
        ("MorForCausalLM", v)
    };
    write_atomic(&dir.join("config.json"), &(serde_json::to_string_pretty(&config)? + "\n"))?;
    if let Some(t) = tokenizer {
        t.save(dir.join("tokenizer.json"))?;
    }
    Ok(arch)
}

/// The vanilla model computing the same function as a plain recursive model (no router,
/// recursion-wise KV caching): parameter set `s` of position `l` is copied to layer `l`.
pub fn unroll<B: Backend>(backend: &B, model: &Model<B>) -> Result<Model<B>> {
    let cfg = &model.cfg;
    anyhow::ensure!(cfg.router.is_none(), "only models without a router can be unrolled (MoR routing has no Llama equivalent)");
    anyhow::ensure!(
        cfg.kv_mode() == mor_config::KvMode::RecursionWise,
        "only recursion-wise KV caching can be unrolled (KV sharing has no Llama equivalent)"
    );
    let src = crate::model_tensors(backend, model);
    let mut out = crate::Tensors::new();
    for (name, t) in &src {
        if !name.starts_with("model.layers.") {
            out.insert(name.clone(), t.clone());
        }
    }
    for (l, &set) in model.map.param_set.iter().enumerate() {
        let prefix = format!("model.layers.{set}.");
        for (name, t) in &src {
            if let Some(rest) = name.strip_prefix(&prefix) {
                out.insert(format!("model.layers.{l}.{rest}"), t.clone());
            }
        }
    }
    let mut vcfg = cfg.clone();
    vcfg.recursion = None;
    crate::build_model(backend, vcfg, &out, &[], 0)
}

/// Export host tensors of a vanilla config without building a model (tests, tools).
pub fn export_tensors(cfg: &ModelConfig, tensors: &Tensors, dir: &Path) -> Result<()> {
    let be = mor_engine::Cpu::<f32>::new();
    let model = crate::build_model(&be, cfg.clone(), tensors, &[], 0)?;
    export(&be, &model, None, None, dir).map(|_| ())
}

pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
