//! One loader for every kind of `--model PATH`, and writing imported models as mor checkpoints.
//!
//! `PATH` may be:
//! * a **GGUF file** (Llama architecture; tokenizer from its metadata);
//! * a **Hugging Face folder** (`config.json` with `model_type: "llama"`, safetensors;
//!   tokenizer from `tokenizer.json`);
//! * a **mor export** (`config.json` with `model_type: "mor"`, see [`crate::export`]);
//! * a **mor run or checkpoint directory** (`state.json` + `model.safetensors`, as written by
//!   `mor train` or `mor import`); the tokenizer is `tokenizer.json` in that directory or its
//!   parent (run directory).

use crate::{build_model, hf, Imported, FRESH_PREFIXES};
use anyhow::{bail, Context, Result};
use mor_config::{ModelConfig, RunConfig};
use mor_engine::Backend;
use mor_model::{Model, RouterState};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// What a `--model PATH` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Gguf,
    HfLlama,
    MorExport,
    MorCheckpoint,
}

/// A loaded model with what came with it.
pub struct Loaded<B: Backend> {
    pub model: Model<B>,
    pub tokenizer: Option<mor_data::Tokenizer>,
    /// Generation stops at this id (the source's EOS, else the tokenizer's end-of-text).
    pub eos: Option<u32>,
    pub kind: SourceKind,
    pub source: String,
}

/// Decide what `path` is.
pub fn detect(path: &Path) -> Result<SourceKind> {
    if path.is_file() {
        let mut magic = [0u8; 4];
        use std::io::Read;
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .with_context(|| format!("reading {}", path.display()))?;
        if &magic == b"GGUF" {
            return Ok(SourceKind::Gguf);
        }
        bail!("{}: a file, but not a GGUF file (expected a .gguf file, a Hugging Face folder or a mor run/checkpoint directory)", path.display());
    }
    if !path.is_dir() {
        bail!("{}: no such file or directory", path.display());
    }
    if path.join(mor_train::checkpoint::STATE_FILE).is_file() || mor_train::latest_checkpoint(path).is_some() {
        return Ok(SourceKind::MorCheckpoint);
    }
    let cfg = path.join("config.json");
    if cfg.is_file() {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg)?).with_context(|| format!("{}: not valid JSON", cfg.display()))?;
        return Ok(match v.get("model_type").and_then(Value::as_str) {
            Some("mor") => SourceKind::MorExport,
            _ => SourceKind::HfLlama,
        });
    }
    bail!(
        "{}: not a model directory (no state.json / checkpoint/ of a mor run, no config.json of a Hugging Face or mor export)",
        path.display()
    )
}

/// Read foreign weights (GGUF or Hugging Face) without building a model.
pub fn read_foreign(path: &Path) -> Result<Imported> {
    match detect(path)? {
        SourceKind::Gguf => crate::gguf::read_gguf(path),
        SourceKind::HfLlama => hf::read_hf(path),
        k => bail!("{}: a {k:?}, not GGUF or Hugging Face weights", path.display()),
    }
}

fn find_tokenizer(dirs: &[&Path]) -> Result<Option<mor_data::Tokenizer>> {
    for d in dirs {
        let p = d.join("tokenizer.json");
        if p.is_file() {
            return Ok(Some(mor_data::Tokenizer::from_file(&p)?));
        }
    }
    Ok(None)
}

/// Load any supported model (see the module docs) on `backend`.
pub fn load_any<B: Backend>(backend: &B, path: &Path) -> Result<Loaded<B>> {
    let kind = detect(path)?;
    match kind {
        SourceKind::Gguf | SourceKind::HfLlama => {
            let imp = read_foreign(path)?;
            let model = build_model(backend, imp.config.clone(), &imp.tensors, &[], 0)
                .with_context(|| format!("building the model of {}", imp.source))?;
            let eos = imp.eos.or_else(|| imp.tokenizer.as_ref().and_then(|t| t.eot_id()));
            Ok(Loaded { model, tokenizer: imp.tokenizer, eos, kind, source: imp.source })
        }
        SourceKind::MorExport => {
            let cfg_path = path.join("config.json");
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
            let mc: ModelConfig = serde_json::from_value(v.get("mor_model").cloned().context("config.json: field mor_model is missing")?)
                .context("config.json: field mor_model is not a valid mor model config")?;
            let tensors = hf::read_safetensors(&path.join("model.safetensors"))?;
            let mut model = build_model(backend, mc, &tensors, &[], 0)?;
            if let Some(rs) = v.get("mor_router_state") {
                model.router_state = serde_json::from_value::<RouterState>(rs.clone()).context("config.json: field mor_router_state is malformed")?;
            }
            let tokenizer = find_tokenizer(&[path])?;
            let eos = v.get("eos_token_id").and_then(Value::as_u64).map(|x| x as u32).or_else(|| tokenizer.as_ref().and_then(|t| t.eot_id()));
            Ok(Loaded { model, tokenizer, eos, kind, source: format!("mor export {}", path.display()) })
        }
        SourceKind::MorCheckpoint => {
            let (model, _cfg) = mor_train::load_model(backend, path)?;
            let parent = path.parent().unwrap_or(Path::new("."));
            let ckpt = path.join(mor_train::checkpoint::CHECKPOINT_DIR);
            let tokenizer = find_tokenizer(&[path, parent, &ckpt])?;
            let eos = tokenizer.as_ref().and_then(|t| t.eot_id());
            Ok(Loaded { model, tokenizer, eos, kind, source: format!("mor checkpoint {}", path.display()) })
        }
    }
}

/// A training config for an imported model: the model table as given, and placeholder
/// `[train]` values for up-training (edit `config.toml` before `mor train`).
pub fn default_run_config(name: &str, model: ModelConfig) -> RunConfig {
    let seq_len = model.max_seq_len.min(2048);
    let text = format!("seq_len = {seq_len}\nmicro_batch = 8\nsteps = 1000\nlr = 3e-4\nwarmup_steps = 100\n");
    let train: mor_config::TrainConfig = toml::from_str(&text).expect("static train table parses");
    RunConfig { name: name.to_string(), model, train, data: Default::default() }
}

/// Write `model` as a mor checkpoint directory that [`load_any`] / `mor_train::load_model`
/// read: `model.safetensors`, `state.json` (step 0, config, router state), `config.toml` (the
/// run config) and `tokenizer.json` when known.
pub fn save_mor_checkpoint<B: Backend>(
    backend: &B,
    model: &Model<B>,
    tokenizer: Option<&mor_data::Tokenizer>,
    name: &str,
    dir: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let run = default_run_config(name, model.cfg.clone());
    mor_train::checkpoint::save_model_weights(&dir.join(mor_train::checkpoint::MODEL_FILE), backend, &model.params)?;
    let state = json!({ "step": 0, "config": run, "router": model.router_state, "data": null });
    crate::export::write_atomic(&dir.join("config.toml"), &run.to_toml())?;
    if let Some(t) = tokenizer {
        t.save(dir.join("tokenizer.json"))?;
    }
    // state.json last: its presence marks the directory as a complete checkpoint.
    crate::export::write_atomic(&dir.join(mor_train::checkpoint::STATE_FILE), &(serde_json::to_string_pretty(&state)? + "\n"))?;
    Ok(dir.to_path_buf())
}

/// Re-export for callers that build models from imported tensors with fresh routers.
pub fn fresh_prefixes() -> &'static [&'static str] {
    FRESH_PREFIXES
}
