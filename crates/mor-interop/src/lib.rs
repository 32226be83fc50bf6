//! mor-interop: getting weights into and out of mor models.
//!
//! * [`gguf`]: Llama-architecture GGUF files (llama.cpp) → HF-named f32 tensors + [`ModelConfig`]
//!   from the GGUF metadata. llama.cpp stores the Q/K projections permuted so that RoPE pairs are
//!   adjacent (interleaved); [`gguf::unpermute_rows`] restores the Hugging Face rotate-half layout
//!   that mor's RoPE uses.
//! * [`hf`]: Hugging Face folders (`config.json` + `model.safetensors` or a sharded index;
//!   F32 / F16 / BF16) of `LlamaForCausalLM` models.
//! * [`init`]: recursive / MoR models initialised from a vanilla model's layers for up-training
//!   (MOR_SPEC 2.1, paper Table 12): `stepwise`, `average`, `lower`, `upper`.
//! * [`export`]: a vanilla model → a folder that `transformers` loads as `LlamaForCausalLM`;
//!   recursive / MoR models → the documented mor layout ([`export`] module docs).
//! * [`load`]: one entry point, [`load::load_any`], for everything a `--model PATH` can name:
//!   a mor run / checkpoint directory, a GGUF file, a Hugging Face folder or a mor export.
//!
//! Every error about a tensor or a metadata field names it.

pub mod export;
pub mod gguf;
pub mod hf;
pub mod init;
pub mod load;

use anyhow::{bail, Result};
use mor_config::ModelConfig;
use mor_engine::Backend;
use mor_model::Model;
use std::collections::BTreeMap;

/// A host tensor: row-major f32 data with its (outermost-first) shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data }
    }
}

/// Tensors by mor / Hugging Face name (`model.layers.3.self_attn.q_proj.weight`).
pub type Tensors = BTreeMap<String, Tensor>;

/// Weights read from a foreign format, with the configuration they imply.
pub struct Imported {
    pub config: ModelConfig,
    pub tensors: Tensors,
    /// The tokenizer that came with the weights (GGUF metadata or `tokenizer.json`).
    pub tokenizer: Option<mor_data::Tokenizer>,
    /// End-of-sequence id declared by the source (generation stops there).
    pub eos: Option<u32>,
    /// Human-readable description of the source.
    pub source: String,
}

/// Name prefixes of parameters that may be absent from imported tensors and then keep their
/// fresh initialisation (routers do not exist in a vanilla checkpoint).
pub const FRESH_PREFIXES: &[&str] = &["model.routers.", "model.aux_routers."];

/// Build a model for `cfg` and set every parameter from `tensors` (by name, shapes checked).
/// Parameters whose name starts with one of `fresh` may be missing and keep the initialisation
/// drawn from `seed`; any other missing tensor, any wrongly shaped tensor and any tensor the
/// model does not have is an error naming the tensor.
pub fn build_model<B: Backend>(backend: &B, cfg: ModelConfig, tensors: &Tensors, fresh: &[&str], seed: u64) -> Result<Model<B>> {
    let mut model = Model::new(backend, cfg, seed)?;
    for i in 0..model.params.info.len() {
        let info = &model.params.info[i];
        match tensors.get(&info.name) {
            Some(t) => {
                if t.shape != info.shape {
                    bail!("tensor {}: shape {:?}, the model expects {:?}", info.name, t.shape, info.shape);
                }
                backend.write_f32(&mut model.params.values[i], &t.data);
            }
            None if fresh.iter().any(|p| info.name.starts_with(p)) => {}
            None => bail!("tensor {} is missing (the model config needs it)", info.name),
        }
    }
    for name in tensors.keys() {
        if model.params.find(name).is_none() {
            bail!("tensor {name} is not a parameter of this model config");
        }
    }
    Ok(model)
}

/// All parameters of a model as host tensors, by name.
pub fn model_tensors<B: Backend>(backend: &B, model: &Model<B>) -> Tensors {
    model
        .params
        .info
        .iter()
        .zip(&model.params.values)
        .map(|(info, v)| (info.name.clone(), Tensor::new(info.shape.clone(), backend.to_f32(v))))
        .collect()
}

/// A float as the shortest decimal that round-trips through f32 (metadata often stores 1e-5 as
/// the f32 `9.99999974e-6`; configs should say `1e-5`).
pub fn clean_f32(x: f64) -> f64 {
    format!("{}", x as f32).parse().unwrap_or(x)
}
