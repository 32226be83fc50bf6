//! Tokenizers: load a Hugging Face `tokenizer.json`, build one from a GGUF file's metadata,
//! or train a byte-level BPE on local text. Everything runs through the HF `tokenizers` crate.
//!
//! [`Tokenizer::encode`] treats its input as *data*: special-token strings such as
//! `<|endoftext|>` occurring in the text are tokenized as ordinary text, never turned into the
//! special id (the llama.cpp `parse_special = false` behaviour). Use
//! [`Tokenizer::encode_with_special`] for prompts that contain control tokens on purpose.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Names tried, in order, for the end-of-text / document-separator token.
pub const EOT_CANDIDATES: &[&str] = &["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"];

/// A loaded tokenizer plus what the data pipeline needs to know about it.
#[derive(Clone)]
pub struct Tokenizer {
    /// Splits special-token strings like ordinary text.
    data: tokenizers::Tokenizer,
    /// Recognises special-token strings.
    special: tokenizers::Tokenizer,
    json: String,
    hash: String,
    vocab_size: usize,
    eot: Option<u32>,
    /// The fast path for byte-level BPE (see `fast.rs`); None: encode through HF.
    fast: Option<std::sync::Arc<crate::fast::FastBpe>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eot", &self.eot)
            .field("hash", &self.hash)
            .finish()
    }
}

fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

impl Tokenizer {
    /// Load a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("reading tokenizer {}", path.display()))?;
        Self::from_json_str(&s).with_context(|| format!("loading tokenizer {}", path.display()))
    }

    /// A `tokenizer.json`, or the tokenizer inside a GGUF file (recognised by its magic).
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut magic = [0u8; 4];
        let is_gguf = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && &magic == b"GGUF";
        if is_gguf {
            Self::from_gguf(&mor_gguf::GgufFile::open(path)?)
        } else {
            Self::from_file(path)
        }
    }

    /// Parse the contents of a `tokenizer.json`.
    pub fn from_json_str(s: &str) -> Result<Self> {
        let tk: tokenizers::Tokenizer = s.parse().map_err(tk_err)?;
        Self::from_hf(tk)
    }

    /// Wrap an HF tokenizer.
    pub fn from_hf(tk: tokenizers::Tokenizer) -> Result<Self> {
        // Hash the canonical (compact) serialisation so whitespace in the file does not matter.
        let json = tk.to_string(false).map_err(tk_err)?;
        let hash = hex(&Sha256::digest(json.as_bytes()));
        let vocab_size = tk
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        let eot = EOT_CANDIDATES.iter().find_map(|t| tk.token_to_id(t));
        let fast = serde_json::from_str::<Value>(&json)
            .ok()
            .and_then(|v| crate::fast::FastBpe::from_json(&v))
            .map(std::sync::Arc::new);
        let mut data = tk.clone();
        data.set_encode_special_tokens(true);
        let mut special = tk;
        special.set_encode_special_tokens(false);
        Ok(Tokenizer {
            data,
            special,
            json,
            hash,
            vocab_size,
            eot,
            fast,
        })
    }

    /// Build the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &mor_gguf::GgufFile) -> Result<Self> {
        let v = gguf_tokenizer_json(g)
            .with_context(|| format!("building a tokenizer from {}", g.path.display()))?;
        Self::from_json_str(&v.to_string())
    }

    /// Train a byte-level BPE (GPT-2 bytes, digits split individually, no normaliser, no
    /// prefix space: the SmolLM recipe) on `docs`. `<|endoftext|>` gets id 0. `vocab_size`
    /// counts everything, special token included.
    pub fn train_bpe<I, S>(docs: I, opts: &TrainOptions) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        use tokenizers::models::bpe::{BpeTrainer, BPE};
        use tokenizers::models::TrainerWrapper;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::AddedToken;
        ensure!(
            opts.vocab_size >= 256 + opts.special_tokens.len(),
            "vocab size {} is below the 256 byte symbols plus {} special tokens",
            opts.vocab_size,
            opts.special_tokens.len()
        );
        let specials: Vec<AddedToken> = opts
            .special_tokens
            .iter()
            .map(|s| AddedToken::from(s.clone(), true))
            .collect();
        let trainer = BpeTrainer::builder()
            .vocab_size(opts.vocab_size)
            .min_frequency(opts.min_frequency)
            .show_progress(opts.show_progress)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        // Start from the full pipeline (pre-tokenizer, decoder) with an empty model.
        let skeleton = byte_level_bpe_json(
            &pre_tokenizer_json("smollm")?,
            json!({}),
            json!([]),
            false,
            &[],
        );
        let mut tk: tokenizers::Tokenizer = skeleton.to_string().parse().map_err(tk_err)?;
        tk.with_model(BPE::default());
        tk.train(&mut trainer, docs).map_err(tk_err)?;
        Self::from_hf(tk)
    }

    /// Write `tokenizer.json` (pretty-printed) atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let s = self.special.to_string(true).map_err(tk_err)?;
        crate::util::write_atomic(path, s.as_bytes())
    }

    /// Token ids of `text`, special-token strings treated as plain text, no BOS/EOS added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(f) = &self.fast {
            let mut out = Vec::with_capacity(text.len() / 3 + 1);
            f.encode(text, &mut out);
            return Ok(out);
        }
        self.encode_reference(text)
    }

    /// Whether [`encode`](Self::encode) uses the fast byte-level BPE path.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// [`encode`](Self::encode) through the HF pipeline (the reference the fast path is
    /// tested against).
    pub fn encode_reference(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .data
            .encode_fast(text, false)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    /// Like [`encode`](Self::encode) but special-token strings become their ids.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .special
            .encode_fast(text, false)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids` (special tokens included as their strings).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.special.decode(ids, false).map_err(tk_err)
    }

    /// Text of `ids` with special tokens dropped.
    pub fn decode_skip_special(&self, ids: &[u32]) -> Result<String> {
        self.special.decode(ids, true).map_err(tk_err)
    }

    /// Number of ids (largest id + 1), added tokens included: the embedding size needed.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    /// The document separator: the id of `<|endoftext|>` (or a close equivalent).
    pub fn eot_id(&self) -> Option<u32> {
        self.eot
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.special.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.special.id_to_token(id)
    }
    /// Hex SHA-256 of the canonical JSON: two tokenizers with the same hash encode alike.
    pub fn hash(&self) -> &str {
        &self.hash
    }
    /// The canonical compact JSON.
    pub fn to_json(&self) -> &str {
        &self.json
    }
    /// The underlying HF tokenizer (special tokens recognised).
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.special
    }
}

/// Options of [`Tokenizer::train_bpe`].
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub vocab_size: usize,
    pub min_frequency: u64,
    pub special_tokens: Vec<String>,
    pub show_progress: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            vocab_size: 4096,
            min_frequency: 2,
            special_tokens: vec!["<|endoftext|>".into()],
            show_progress: false,
        }
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// GGUF -> tokenizer.json

/// GPT-2's pre-tokenizer regex (and llama.cpp's for `gpt2`-family vocabularies).
const GPT2_RE: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer for a llama.cpp `tokenizer.ggml.pre` name, as HF JSON: a sequence of
/// isolating regex splits (llama.cpp applies its regex list the same way) followed by the
/// GPT-2 byte mapping. Returns an error for pre-tokenizers not (yet) mapped.
pub fn pre_tokenizer_json(pre: &str) -> Result<Value> {
    let split = |re: &str| {
        json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false})
    };
    let bytes = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
    };
    let seq = |v: Vec<Value>| json!({"type": "Sequence", "pretokenizers": v});
    Ok(match pre {
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "default" | "" => bytes(true),
        // SmolLM / StarCoder family: every digit on its own, then GPT-2.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => seq(vec![
            json!({"type": "Digits", "individual_digits": true}),
            bytes(true),
        ]),
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "dbrx" => {
            seq(vec![split(LLAMA3_RE), bytes(false)])
        }
        "qwen2" | "qwen35" | "stablelm2" | "hunyuan" | "megrez" => {
            seq(vec![split(QWEN2_RE), bytes(false)])
        }
        "falcon" => seq(vec![
            split(r"[\p{P}\$\+<=>\^~\|`]+"),
            split(GPT2_RE),
            split(r"[0-9][0-9][0-9]"),
            bytes(false),
        ]),
        other => bail!("GGUF pre-tokenizer {other:?} is not supported (known: gpt2, smollm, starcoder, refact, command-r, llama-bpe, qwen2, falcon, ...)"),
    })
}

fn byte_level_bpe_json(
    pre: &Value,
    vocab: Value,
    merges: Value,
    ignore_merges: bool,
    added: &[Value],
) -> Value {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        }
    })
}

/// The `tokenizer.json` (as a JSON value) for the vocabulary stored in a GGUF file.
/// Supports `tokenizer.ggml.model = gpt2` (byte-level BPE) with the pre-tokenizers of
/// [`pre_tokenizer_json`]. Control tokens (type 3) become special added tokens, user-defined
/// ones (type 4) plain added tokens, as llama.cpp treats them.
pub fn gguf_tokenizer_json(g: &mor_gguf::GgufFile) -> Result<Value> {
    let model = g
        .get_str("tokenizer.ggml.model")
        .context("no tokenizer.ggml.model in the GGUF metadata")?;
    ensure!(
        model == "gpt2",
        "GGUF tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
    );
    let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let merges = g.get_str_array("tokenizer.ggml.merges")?;
    let types = match g.get("tokenizer.ggml.token_type") {
        Some(_) => g.get_i64_array("tokenizer.ggml.token_type")?,
        None => vec![1; tokens.len()],
    };
    ensure!(
        types.len() == tokens.len(),
        "{} token types for {} tokens",
        types.len(),
        tokens.len()
    );
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        // Later duplicates would shadow earlier ids; llama.cpp keeps the first.
        if !vocab.contains_key(tok) {
            vocab.insert(tok.to_string(), json!(id));
        }
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3,
            }));
        }
    }
    let merges: Vec<Value> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // llama.cpp splits at the first space after the first byte.
            let k = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(k, _)| k)
                .with_context(|| format!("merge #{i} {m:?} has no space"))?;
            Ok(json!([&m[..k], &m[k + 1..]]))
        })
        .collect::<Result<_>>()?;
    let ignore_merges = matches!(pre, "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "dbrx");
    let mut v = byte_level_bpe_json(
        &pre_tokenizer_json(pre)?,
        Value::Object(vocab),
        Value::Array(merges),
        ignore_merges,
        &added,
    );
    // BOS/EOS insertion the way the GGUF asks for it.
    let add_bos = g.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
    let add_eos = g.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
    if add_bos || add_eos {
        let tok = |key: &str| -> Result<(String, i64)> {
            let id = g.get_i64(key).with_context(|| format!("{key} is missing"))?;
            let t = tokens
                .get(id as usize)
                .with_context(|| format!("{key} = {id} is out of range"))?;
            Ok((t.to_string(), id))
        };
        let mut single = Vec::new();
        let mut specials = serde_json::Map::new();
        if add_bos {
            let (t, id) = tok("tokenizer.ggml.bos_token_id")?;
            single.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        if add_eos {
            let (t, id) = tok("tokenizer.ggml.eos_token_id")?;
            single.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        let mut pair = single.clone();
        pair.extend(single.iter().map(|x| {
            let mut x = x.clone();
            if let Some(s) = x.get_mut("Sequence") {
                s["id"] = json!("B");
            }
            x
        }));
        v["post_processor"] = json!({
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
                {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
            ]
        });
    }
    Ok(v)
}
