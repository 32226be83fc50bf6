//! Import / export / initialisation tests on small synthetic models (no downloaded assets).

use mor_config::{ModelConfig, RouterKind, Sharing};
use mor_engine::Cpu;
use mor_interop::gguf::{permute_rows, unpermute_rows};
use mor_interop::init::{adjusted_layers, recursive_from_vanilla, round_linspace, InitStrategy, RecursiveSpec};
use mor_interop::{build_model, model_tensors, Tensor, Tensors};
use mor_model::{Batch, Model, Routing};
use std::path::Path;

type Be = Cpu<f32>;

fn tiny_cfg(layers: usize, tied: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 48,
        hidden_size: 16,
        num_layers: layers,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        intermediate_size: 24,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_seq_len: 64,
        tie_embeddings: tied,
        init_std: 0.2,
        recursion: None,
        router: None,
    }
}

/// Logits of every position of `ids`.
fn all_logits(be: &Be, m: &mut Model<Be>, ids: &[u32]) -> Vec<f32> {
    let targets = vec![u32::MAX; ids.len()];
    let batch = Batch { inputs: ids, targets: &targets, batch: 1, seq_len: ids.len(), doc_starts: None };
    m.forward(be, &batch, Routing::Threshold, false, 1.0).unwrap();
    let rows: Vec<usize> = (0..ids.len()).collect();
    m.logits_at(be, &rows)
}

fn ids() -> Vec<u32> {
    (0..12).map(|i| (i * 7 + 3) % 48).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

// ------------------------------------------------------------------ Q/K permutation and RoPE

/// HF rotate-half RoPE on one head vector.
fn rope_half(x: &[f64], pos: f64, theta: f64) -> Vec<f64> {
    let hd = x.len();
    let h = hd / 2;
    let mut out = vec![0.0; hd];
    for i in 0..h {
        let a = pos * theta.powf(-2.0 * i as f64 / hd as f64);
        out[i] = x[i] * a.cos() - x[i + h] * a.sin();
        out[i + h] = x[i + h] * a.cos() + x[i] * a.sin();
    }
    out
}

/// llama.cpp's "normal" RoPE: adjacent pairs.
fn rope_interleaved(x: &[f64], pos: f64, theta: f64) -> Vec<f64> {
    let hd = x.len();
    let mut out = vec![0.0; hd];
    for i in 0..hd / 2 {
        let a = pos * theta.powf(-2.0 * i as f64 / hd as f64);
        out[2 * i] = x[2 * i] * a.cos() - x[2 * i + 1] * a.sin();
        out[2 * i + 1] = x[2 * i] * a.sin() + x[2 * i + 1] * a.cos();
    }
    out
}

#[test]
fn unpermute_maps_interleaved_rope_to_rotate_half() {
    let (heads, hd, cols) = (3, 8, 5);
    let hf: Vec<f32> = (0..heads * hd * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
    let gg = permute_rows(&hf, heads, hd, cols);
    assert_eq!(unpermute_rows(&gg, heads, hd, cols), hf);
    assert_ne!(gg, hf);
    // A projection computed with the GGUF rows and rotated with interleaved RoPE gives the same
    // attention scores as the HF rows with rotate-half RoPE.
    let x: Vec<f64> = (0..cols).map(|i| (i as f64 * 0.3).sin()).collect();
    let y: Vec<f64> = (0..cols).map(|i| (i as f64 * 0.7).cos()).collect();
    let proj = |w: &[f32], v: &[f64], h: usize| -> Vec<f64> {
        (0..hd).map(|r| (0..cols).map(|c| w[(h * hd + r) * cols + c] as f64 * v[c]).sum()).collect()
    };
    for h in 0..heads {
        let (qh, kh) = (rope_half(&proj(&hf, &x, h), 5.0, 100.0), rope_half(&proj(&hf, &y, h), 2.0, 100.0));
        let (qg, kg) = (rope_interleaved(&proj(&gg, &x, h), 5.0, 100.0), rope_interleaved(&proj(&gg, &y, h), 2.0, 100.0));
        let sh: f64 = qh.iter().zip(&kh).map(|(a, b)| a * b).sum();
        let sg: f64 = qg.iter().zip(&kg).map(|(a, b)| a * b).sum();
        assert!((sh - sg).abs() < 1e-9, "head {h}: {sh} vs {sg}");
    }
}

// ------------------------------------------------------------------ a tiny GGUF writer

enum Kv {
    Str(&'static str),
    U32(u32),
    F32(f32),
}

struct GgufTensor {
    name: String,
    dims: Vec<u64>, // ggml order (innermost first)
    ty: u32,
    data: Vec<u8>,
}

fn gguf_bytes(kvs: &[(&str, Kv)], tensors: &[GgufTensor]) -> Vec<u8> {
    fn s(b: &mut Vec<u8>, x: &str) {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    }
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        s(&mut b, k);
        match v {
            Kv::Str(x) => {
                b.extend(8u32.to_le_bytes());
                s(&mut b, x);
            }
            Kv::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Kv::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
        }
    }
    let mut off = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        offsets.push(off);
        off += (t.data.len() as u64).div_ceil(32) * 32;
    }
    for (t, o) in tensors.iter().zip(&offsets) {
        s(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(t.ty.to_le_bytes());
        b.extend(o.to_le_bytes());
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for t in tensors {
        b.extend(&t.data);
        while b.len() % 32 != 0 {
            b.push(0);
        }
    }
    b
}

fn f32_tensor(name: &str, t: &Tensor) -> GgufTensor {
    GgufTensor {
        name: name.into(),
        dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
        ty: 0,
        data: t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// A GGUF file (F32 tensors, llama.cpp names and Q/K layout) of a mor vanilla model.
fn gguf_of(cfg: &ModelConfig, t: &Tensors) -> (Vec<(&'static str, Kv)>, Vec<GgufTensor>) {
    let kvs = vec![
        ("general.architecture", Kv::Str("llama")),
        ("llama.block_count", Kv::U32(cfg.num_layers as u32)),
        ("llama.context_length", Kv::U32(cfg.max_seq_len as u32)),
        ("llama.embedding_length", Kv::U32(cfg.hidden_size as u32)),
        ("llama.feed_forward_length", Kv::U32(cfg.intermediate_size as u32)),
        ("llama.attention.head_count", Kv::U32(cfg.num_heads as u32)),
        ("llama.attention.head_count_kv", Kv::U32(cfg.num_kv_heads as u32)),
        ("llama.rope.freq_base", Kv::F32(cfg.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Kv::F32(cfg.rms_norm_eps as f32)),
    ];
    let mut ts = vec![f32_tensor("token_embd.weight", &t["model.embed_tokens.weight"]), f32_tensor("output_norm.weight", &t["model.norm.weight"])];
    if let Some(h) = t.get("lm_head.weight") {
        ts.push(f32_tensor("output.weight", h));
    }
    let d = cfg.hidden_size;
    for l in 0..cfg.num_layers {
        let m = |n: &str| &t[&format!("model.layers.{l}.{n}.weight")];
        let permuted = |n: &str, heads: usize| {
            let x = m(n);
            Tensor::new(x.shape.clone(), permute_rows(&x.data, heads, cfg.head_dim, d))
        };
        let b = |n: &str| format!("blk.{l}.{n}.weight");
        ts.push(f32_tensor(&b("attn_norm"), m("input_layernorm")));
        ts.push(f32_tensor(&b("attn_q"), &permuted("self_attn.q_proj", cfg.num_heads)));
        ts.push(f32_tensor(&b("attn_k"), &permuted("self_attn.k_proj", cfg.num_kv_heads)));
        ts.push(f32_tensor(&b("attn_v"), m("self_attn.v_proj")));
        ts.push(f32_tensor(&b("attn_output"), m("self_attn.o_proj")));
        ts.push(f32_tensor(&b("ffn_norm"), m("post_attention_layernorm")));
        ts.push(f32_tensor(&b("ffn_gate"), m("mlp.gate_proj")));
        ts.push(f32_tensor(&b("ffn_up"), m("mlp.up_proj")));
        ts.push(f32_tensor(&b("ffn_down"), m("mlp.down_proj")));
    }
    (kvs, ts)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn gguf_import_matches_the_original_model() {
    let be = Be::new();
    for tied in [true, false] {
        let cfg = tiny_cfg(2, tied);
        let mut orig = Model::new(&be, cfg.clone(), 7).unwrap();
        let t = model_tensors(&be, &orig);
        let (kvs, ts) = gguf_of(&cfg, &t);
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "m.gguf", &gguf_bytes(&kvs, &ts));
        let imp = mor_interop::gguf::read_gguf(&p).unwrap();
        let mut want = cfg.clone();
        want.init_std = 0.02; // not stored in GGUF; the HF default
        assert_eq!(imp.config, want, "config from metadata");
        assert_eq!(imp.tensors, t, "tensors (Q/K un-permuted)");
        let loaded = mor_interop::load::load_any(&be, &p).unwrap();
        let mut m = loaded.model;
        assert_eq!(all_logits(&be, &mut m, &ids()), all_logits(&be, &mut orig, &ids()));
    }
}

#[test]
fn corrupt_or_unsupported_gguf_errors_name_the_field_or_tensor() {
    let be = Be::new();
    let cfg = tiny_cfg(1, true);
    let orig = Model::new(&be, cfg.clone(), 1).unwrap();
    let t = model_tensors(&be, &orig);
    let dir = tempfile::tempdir().unwrap();
    let read = |kvs: &[(&str, Kv)], ts: &[GgufTensor], name: &str| {
        let p = write(dir.path(), name, &gguf_bytes(kvs, ts));
        err_of(mor_interop::gguf::read_gguf(&p).map(|_| ()))
    };

    let (mut kvs, ts) = gguf_of(&cfg, &t);
    kvs[0].1 = Kv::Str("gpt2");
    let e = read(&kvs, &ts, "arch.gguf");
    assert!(e.contains("general.architecture") && e.contains("gpt2"), "{e}");

    let (mut kvs, ts) = gguf_of(&cfg, &t);
    kvs.retain(|(k, _)| *k != "llama.block_count");
    let e = read(&kvs, &ts, "nolayers.gguf");
    assert!(e.contains("llama.block_count"), "{e}");

    let (mut kvs, ts) = gguf_of(&cfg, &t);
    kvs.push(("llama.rope.scaling.type", Kv::Str("yarn")));
    let e = read(&kvs, &ts, "yarn.gguf");
    assert!(e.contains("llama.rope.scaling.type"), "{e}");

    let (kvs, mut ts) = gguf_of(&cfg, &t);
    ts.retain(|x| x.name != "blk.0.ffn_up.weight");
    let e = read(&kvs, &ts, "missing.gguf");
    assert!(e.contains("blk.0.ffn_up.weight") && e.contains("missing"), "{e}");

    let (kvs, mut ts) = gguf_of(&cfg, &t);
    let i = ts.iter().position(|x| x.name == "blk.0.attn_v.weight").unwrap();
    ts[i].dims = vec![16, 4]; // 64 values instead of 16 x 8
    ts[i].data.truncate(64 * 4);
    let e = read(&kvs, &ts, "shape.gguf");
    assert!(e.contains("blk.0.attn_v.weight") && e.contains("shape"), "{e}");

    // An IQ2_XXS token embedding (type 16, 256-element blocks of 66 bytes; 48 x 16 = 3 blocks):
    // the file parses, the import names the tensor and the type.
    let (kvs, mut ts) = gguf_of(&cfg, &t);
    let i = ts.iter().position(|x| x.name == "token_embd.weight").unwrap();
    ts[i] = GgufTensor { name: ts[i].name.clone(), dims: vec![16, 48], ty: 16, data: vec![0; 3 * 66] };
    let e = read(&kvs, &ts, "iq2.gguf");
    assert!(e.contains("token_embd.weight") && e.contains("IQ2XXS") && e.contains("not implemented"), "{e}");

    let (kvs, mut ts) = gguf_of(&cfg, &t);
    ts.push(GgufTensor { name: "rope_freqs.weight".into(), dims: vec![2], ty: 0, data: vec![0; 8] });
    let e = read(&kvs, &ts, "ropefreq.gguf");
    assert!(e.contains("rope_freqs.weight"), "{e}");

    let (kvs, ts) = gguf_of(&cfg, &t);
    let mut bytes = gguf_bytes(&kvs, &ts);
    bytes.truncate(bytes.len() - 100);
    let p = write(dir.path(), "trunc.gguf", &bytes);
    let e = err_of(mor_interop::gguf::read_gguf(&p).map(|_| ()));
    assert!(e.contains("truncated"), "{e}");

    let (kvs, mut ts) = gguf_of(&cfg, &t);
    let i = ts.iter().position(|x| x.name == "blk.0.attn_norm.weight").unwrap();
    ts[i].data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let e = read(&kvs, &ts, "nan.gguf");
    assert!(e.contains("blk.0.attn_norm.weight") && e.contains("non-finite"), "{e}");

    let p = write(dir.path(), "notgguf.bin", b"hello world, not a model");
    let e = err_of(mor_interop::load::load_any(&be, &p).map(|_| ()));
    assert!(e.contains("not a GGUF file"), "{e}");
}

// ------------------------------------------------------------------ Hugging Face export / import

#[test]
fn hf_export_roundtrip_and_config() {
    let be = Be::new();
    for tied in [true, false] {
        let cfg = tiny_cfg(3, tied);
        let mut orig = Model::new(&be, cfg.clone(), 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let arch = mor_interop::export::export(&be, &orig, None, Some(0), dir.path()).unwrap();
        assert_eq!(arch, "LlamaForCausalLM");
        let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["tie_word_embeddings"], tied);
        assert_eq!(c["num_key_value_heads"], 2);
        assert_eq!(c["head_dim"], 4);
        let st = mor_interop::hf::read_safetensors(&dir.path().join("model.safetensors")).unwrap();
        assert_eq!(st.contains_key("lm_head.weight"), !tied);
        let loaded = mor_interop::load::load_any(&be, dir.path()).unwrap();
        assert_eq!(loaded.kind, mor_interop::load::SourceKind::HfLlama);
        assert_eq!(loaded.model.cfg, cfg);
        let mut m = loaded.model;
        assert_eq!(all_logits(&be, &mut m, &ids()), all_logits(&be, &mut orig, &ids()));
    }
}

#[test]
fn sharded_hf_checkpoints_load() {
    let be = Be::new();
    let cfg = tiny_cfg(2, false);
    let mut orig = Model::new(&be, cfg.clone(), 8).unwrap();
    let good = tempfile::tempdir().unwrap();
    mor_interop::export::export(&be, &orig, None, None, good.path()).unwrap();
    // Split the tensors over two F32 shards plus an index, as transformers saves them.
    let t = model_tensors(&be, &orig);
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(good.path().join("config.json"), d.path().join("config.json")).unwrap();
    let mut map = serde_json::Map::new();
    for (k, part) in [(0usize, "model-00001-of-00002.safetensors"), (1, "model-00002-of-00002.safetensors")] {
        let entries: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = t
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == k)
            .map(|(_, (n, v))| (n.as_str(), "F32", v.shape.clone(), v.data.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        for e in &entries {
            map.insert(e.0.to_string(), serde_json::json!(part));
        }
        std::fs::write(d.path().join(part), safetensors_bytes(&entries)).unwrap();
    }
    std::fs::write(d.path().join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    let mut m = mor_interop::load::load_any(&be, d.path()).unwrap().model;
    assert_eq!(all_logits(&be, &mut m, &ids()), all_logits(&be, &mut orig, &ids()));
}

/// Write a safetensors file by hand (header JSON + raw bytes).
fn safetensors_bytes(entries: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for (name, dtype, shape, data) in entries {
        header.insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + data.len()]}));
        off += data.len();
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h);
    for e in entries {
        b.extend(&e.3);
    }
    b
}

#[test]
fn safetensors_f16_bf16_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let vals = [1.5f32, -2.0, 0.25];
    let f16: Vec<u8> = vals.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    let bf16: Vec<u8> = vals.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    let p = write(dir.path(), "a.safetensors", &safetensors_bytes(&[("a", "F16", vec![3], f16), ("b", "BF16", vec![1, 3], bf16)]));
    let t = mor_interop::hf::read_safetensors(&p).unwrap();
    assert_eq!(t["a"].data, vals);
    assert_eq!(t["b"].shape, vec![1, 3]);
    assert_eq!(t["b"].data, vals);

    let p = write(dir.path(), "i.safetensors", &safetensors_bytes(&[("model.norm.weight", "I32", vec![2], vec![0; 8])]));
    let e = err_of(mor_interop::hf::read_safetensors(&p));
    assert!(e.contains("model.norm.weight") && e.contains("I32"), "{e}");

    let p = write(dir.path(), "c.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all");
    let e = err_of(mor_interop::hf::read_safetensors(&p));
    assert!(e.contains("c.safetensors") && e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn hf_folder_errors_name_the_field_or_tensor() {
    let be = Be::new();
    let cfg = tiny_cfg(1, true);
    let orig = Model::new(&be, cfg.clone(), 2).unwrap();
    let good = tempfile::tempdir().unwrap();
    mor_interop::export::export(&be, &orig, None, None, good.path()).unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(good.path().join("config.json")).unwrap()).unwrap();
    let weights = std::fs::read(good.path().join("model.safetensors")).unwrap();
    let folder = |c: &serde_json::Value, w: &[u8]| {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), serde_json::to_string(c).unwrap()).unwrap();
        std::fs::write(d.path().join("model.safetensors"), w).unwrap();
        d
    };
    let load = |d: &tempfile::TempDir| err_of(mor_interop::load::load_any(&be, d.path()).map(|_| ()));

    let mut c = config.clone();
    c.as_object_mut().unwrap().remove("intermediate_size");
    let e = load(&folder(&c, &weights));
    assert!(e.contains("intermediate_size"), "{e}");

    let mut c = config.clone();
    c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    let e = load(&folder(&c, &weights));
    assert!(e.contains("rope_scaling"), "{e}");

    let mut c = config.clone();
    c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0});
    let e = load(&folder(&c, &weights));
    assert!(e.contains("rope_parameters.rope_type") && e.contains("yarn"), "{e}");

    // transformers 5 style: theta only in rope_parameters.
    let mut c = config.clone();
    c.as_object_mut().unwrap().remove("rope_theta");
    c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 123456.0});
    let m = mor_interop::load::load_any(&be, folder(&c, &weights).path()).unwrap();
    assert_eq!(m.model.cfg.rope_theta, 123456.0);

    let mut c = config.clone();
    c["model_type"] = serde_json::json!("gpt_neox");
    let e = load(&folder(&c, &weights));
    assert!(e.contains("model_type") && e.contains("gpt_neox"), "{e}");

    let mut c = config.clone();
    c["intermediate_size"] = serde_json::json!(20);
    let e = load(&folder(&c, &weights));
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("shape"), "{e}");

    // A weight file missing one tensor.
    let mut t = model_tensors(&be, &orig);
    t.remove("model.layers.0.mlp.up_proj.weight");
    let entries: Vec<(&str, &str, Vec<usize>, Vec<u8>)> =
        t.iter().map(|(k, v)| (k.as_str(), "F32", v.shape.clone(), v.data.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let e = load(&folder(&config, &safetensors_bytes(&entries)));
    assert!(e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("missing"), "{e}");

    // Truncated data.
    let e = load(&folder(&config, &weights[..weights.len() - 64]));
    assert!(e.contains("model.safetensors"), "{e}");
}

// ------------------------------------------------------------------ recursive initialisation

/// A vanilla model whose layer `l` has every weight equal to `l + 1` (so sources are visible).
fn layered_tensors(cfg: &ModelConfig) -> Tensors {
    let be = Be::new();
    let m = Model::new(&be, cfg.clone(), 0).unwrap();
    let mut t = model_tensors(&be, &m);
    for (name, v) in t.iter_mut() {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let l: usize = rest.split('.').next().unwrap().parse().unwrap();
            v.data.iter_mut().for_each(|x| *x = (l + 1) as f32);
        }
    }
    t
}

fn pool_value(t: &Tensors, set: usize) -> f32 {
    let v = &t[&format!("model.layers.{set}.mlp.up_proj.weight")].data;
    assert!(v.iter().all(|x| (x - v[0]).abs() < 1e-6));
    for p in ["self_attn.q_proj", "input_layernorm", "mlp.down_proj", "post_attention_layernorm"] {
        assert!((t[&format!("model.layers.{set}.{p}.weight")].data[0] - v[0]).abs() < 1e-6, "{p} of set {set}");
    }
    v[0] - 1.0 // back to a (fractional, for average) layer index
}

fn spec(sharing: Sharing, n: usize, init: InitStrategy) -> RecursiveSpec {
    RecursiveSpec { sharing, num_recursions: n, init, kv_mode: Default::default(), untie_attention: false, router: None }
}

#[test]
fn linspace_rounding_matches_numpy_and_python_round() {
    // Values printed by numpy: [round(i) for i in np.linspace(...)].
    let expect: Vec<usize> = (1..=13).chain(15..=28).collect();
    assert_eq!(round_linspace(1.0, 28.0, 27), expect);
    assert_eq!(round_linspace(1.0, 27.0, 9), vec![1, 4, 8, 11, 14, 17, 20, 24, 27]);
    assert_eq!(round_linspace(0.0, 29.0, 10), vec![0, 3, 6, 10, 13, 16, 19, 23, 26, 29]);
    // SmolLM2-135M (30 layers), Middle-Cycle N_r=3: sub-sampled to 29 positions.
    let adj = adjusted_layers(Sharing::MiddleCycle, 30, 3).unwrap();
    assert_eq!(adj.len(), 29);
    assert_eq!(adj[0], 0);
    assert_eq!(adj[28], 29);
    assert_eq!(&adj[1..28], &expect[..]);
    assert_eq!(adjusted_layers(Sharing::MiddleCycle, 30, 2).unwrap(), (0..30).collect::<Vec<_>>());
}

#[test]
fn init_strategies_select_the_papers_layers() {
    // Cycle, L = 6, N_r = 3, base_depth 2 (the docstring example of the released code).
    let cfg = tiny_cfg(6, true);
    let t = layered_tensors(&cfg);
    let cases = [
        (InitStrategy::Stepwise, vec![0.0, 5.0]),
        (InitStrategy::Lower, vec![0.0, 1.0]),
        (InitStrategy::Upper, vec![4.0, 5.0]),
        (InitStrategy::Average, vec![2.0, 3.0]), // mean of (0,2,4) and (1,3,5)
    ];
    for (init, want) in cases {
        let (c, out) = recursive_from_vanilla(&cfg, &t, &spec(Sharing::Cycle, 3, init)).unwrap();
        assert_eq!(c.num_layers, 6);
        let got: Vec<f32> = (0..2).map(|s| pool_value(&out, s)).collect();
        assert_eq!(got, want, "cycle {init:?}");
    }
    // Sequence, same model: average groups are consecutive (0,1,2) and (3,4,5).
    let (_, out) = recursive_from_vanilla(&cfg, &t, &spec(Sharing::Sequence, 3, InitStrategy::Average)).unwrap();
    assert_eq!((pool_value(&out, 0), pool_value(&out, 1)), (1.0, 4.0));
    // Middle-Cycle, L = 8, N_r = 3: unique 0 and 7, pool of 2.
    let cfg = tiny_cfg(8, true);
    let t = layered_tensors(&cfg);
    let cases = [
        (InitStrategy::Stepwise, vec![1.0, 6.0]),
        (InitStrategy::Lower, vec![1.0, 2.0]),
        (InitStrategy::Upper, vec![5.0, 6.0]),
        (InitStrategy::Average, vec![3.0, 4.0]), // mean of (1,3,5) and (2,4,6)
    ];
    for (init, want) in cases {
        let (c, out) = recursive_from_vanilla(&cfg, &t, &spec(Sharing::MiddleCycle, 3, init)).unwrap();
        assert_eq!(c.num_layers, 8);
        assert_eq!(pool_value(&out, 0), 0.0, "first unique layer");
        assert_eq!(pool_value(&out, 3), 7.0, "last unique layer");
        let got: Vec<f32> = (1..3).map(|s| pool_value(&out, s)).collect();
        assert_eq!(got, want, "middle cycle {init:?}");
        assert_eq!(out["model.embed_tokens.weight"], t["model.embed_tokens.weight"]);
    }
    // Middle-Cycle with sub-sampling: L = 9, N_r = 3 -> base 2, L' = 8 positions taken from
    // [0] + round(linspace(1, 7, 6)) + [8]: linspace = 1, 2.2, 3.4, 4.6, 5.8, 7.
    let cfg = tiny_cfg(9, true);
    let t = layered_tensors(&cfg);
    let adj = adjusted_layers(Sharing::MiddleCycle, 9, 3).unwrap();
    assert_eq!(adj, vec![0, 1, 2, 3, 5, 6, 7, 8]);
    let (c, out) = recursive_from_vanilla(&cfg, &t, &spec(Sharing::MiddleCycle, 3, InitStrategy::Upper)).unwrap();
    assert_eq!(c.num_layers, 8);
    // upper (middle): adjusted positions 5, 6 -> vanilla layers 6, 7.
    assert_eq!((pool_value(&out, 1), pool_value(&out, 2)), (6.0, 7.0));
    assert_eq!(pool_value(&out, 3), 8.0);
}

#[test]
fn single_recursion_lower_init_reproduces_the_vanilla_model() {
    let be = Be::new();
    let cfg = tiny_cfg(3, true);
    let mut orig = Model::new(&be, cfg.clone(), 11).unwrap();
    let t = model_tensors(&be, &orig);
    let (c, out) = recursive_from_vanilla(&cfg, &t, &spec(Sharing::Cycle, 1, InitStrategy::Lower)).unwrap();
    let mut m = build_model(&be, c, &out, &[], 0).unwrap();
    let d = max_abs_diff(&all_logits(&be, &mut m, &ids()), &all_logits(&be, &mut orig, &ids()));
    assert!(d < 1e-5, "{d}");
}

#[test]
fn plain_recursive_models_unroll_to_llama() {
    let be = Be::new();
    let mut cfg = tiny_cfg(8, true);
    cfg.recursion = Some(serde_json::from_value(serde_json::json!({"sharing": "middle_cycle", "num_recursions": 3})).unwrap());
    let mut rec = Model::new(&be, cfg.clone(), 6).unwrap();
    let mut flat = mor_interop::export::unroll(&be, &rec).unwrap();
    assert!(flat.cfg.recursion.is_none());
    let d = max_abs_diff(&all_logits(&be, &mut flat, &ids()), &all_logits(&be, &mut rec, &ids()));
    assert!(d < 1e-5, "{d}");
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(mor_interop::export::export(&be, &flat, None, None, dir.path()).unwrap(), "LlamaForCausalLM");
    // MoR routing and KV sharing have no Llama equivalent.
    cfg.router = Some(serde_json::from_value(serde_json::json!({"kind": "token"})).unwrap());
    let e = err_of(mor_interop::export::unroll(&be, &Model::new(&be, cfg, 1).unwrap()).map(|_| ()));
    assert!(e.contains("router"), "{e}");
}

#[test]
fn mor_models_from_vanilla_weights_run_and_roundtrip() {
    let be = Be::new();
    let cfg = tiny_cfg(8, true);
    let orig = Model::new(&be, cfg.clone(), 5).unwrap();
    let t = model_tensors(&be, &orig);
    for kind in ["expert", "token"] {
        let router: mor_config::RouterConfig = serde_json::from_value(serde_json::json!({"kind": kind})).unwrap();
        let mut s = spec(Sharing::MiddleCycle, 3, InitStrategy::Stepwise);
        s.router = Some(router);
        s.untie_attention = kind == "expert";
        let (c, out) = recursive_from_vanilla(&cfg, &t, &s).unwrap();
        assert_eq!(c.router.as_ref().unwrap().kind, if kind == "expert" { RouterKind::Expert } else { RouterKind::Token });
        // Routers are not in the tensors: refused without FRESH_PREFIXES, fresh with it.
        let e = err_of(build_model(&be, c.clone(), &out, &[], 0).map(|_| ()));
        assert!(e.contains("model.routers.0"), "{e}");
        let mut m = build_model(&be, c.clone(), &out, mor_interop::FRESH_PREFIXES, 9).unwrap();
        let l1 = all_logits(&be, &mut m, &ids());
        assert!(l1.iter().all(|x| x.is_finite()));
        // mor export layout and the checkpoint directory both load back identically.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(mor_interop::export::export(&be, &m, None, None, &dir.path().join("hf")).unwrap(), "MorForCausalLM");
        mor_interop::load::save_mor_checkpoint(&be, &m, None, "t", &dir.path().join("ck")).unwrap();
        for sub in ["hf", "ck"] {
            let mut back = mor_interop::load::load_any(&be, &dir.path().join(sub)).unwrap().model;
            assert_eq!(back.cfg, c);
            assert_eq!(all_logits(&be, &mut back, &ids()), l1, "{kind} via {sub}");
        }
    }
}
