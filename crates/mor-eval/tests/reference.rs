//! SmolLM2-135M (GGUF, Q4_1) through mor's import, tokenizer and harness, compared with the
//! numbers of an independent numpy implementation (`scripts/reference/llama_ref.py`: float64,
//! the `gguf` package's dequantisation, llama.cpp's interleaved RoPE on the GGUF layout, its own
//! byte-level BPE and lm-evaluation-harness request logic), stored in
//! `tests/data/reference_smollm2.json`. Gated on the downloaded assets (see `common`).

mod common;

use mor_engine::Cpu;
use mor_eval::scorer::{encode_pair, ModelScorer, Scorer, TextEncoder};
use mor_eval::task::{score_doc, Doc};
use mor_model::{Model, Routing, Sampler};
use serde_json::Value;

type Be = Cpu<f32>;

fn reference() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/reference_smollm2.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// |ll - ref| tolerance: f32 forward vs f64 reference.
fn ll_close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 2e-3 + 2e-4 * b.abs()
}

fn load() -> Option<(Be, Model<Be>, mor_data::Tokenizer)> {
    let gguf = common::smollm2_gguf()?;
    let be = Be::new();
    let l = mor_interop::load::load_any(&be, &gguf).unwrap();
    Some((be, l.model, l.tokenizer.unwrap()))
}

#[test]
fn smollm2_import_config_from_gguf_metadata() {
    let Some(gguf) = common::smollm2_gguf() else { return };
    let g = mor_gguf::GgufFile::open(&gguf).unwrap();
    let c = mor_interop::gguf::gguf_config(&g).unwrap();
    assert_eq!((c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim), (30, 576, 9, 3, 64));
    assert_eq!((c.intermediate_size, c.vocab_size), (1536, 49152));
    assert_eq!(c.rope_theta, 1e5);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert!(c.tie_embeddings);
}

#[test]
fn smollm2_greedy_tokens_and_logits_match_the_numpy_reference() {
    let Some((be, mut model, tok)) = load() else { return };
    let r = reference();
    // Logits at three positions of one prompt.
    let probe = &r["logits_probe"];
    let pids = ids(&probe["ids"]);
    assert_eq!(tok.encode("The capital of France is Paris, and the capital of Germany is").unwrap(), pids);
    let targets = vec![u32::MAX; pids.len()];
    let batch = mor_model::Batch { inputs: &pids, targets: &targets, batch: 1, seq_len: pids.len(), doc_starts: None };
    model.forward(&be, &batch, Routing::Threshold, false, 1.0).unwrap();
    let stride = probe["sample_stride"].as_u64().unwrap() as usize;
    let vocab = model.cfg.vocab_size;
    for row in probe["rows"].as_array().unwrap() {
        let pos = row["position"].as_u64().unwrap() as usize;
        let lg = model.logits_at(&be, &[pos]);
        let want: Vec<f64> = row["sample_logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let got: Vec<f64> = (0..vocab).step_by(stride).map(|i| lg[i] as f64).collect();
        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        eprintln!("logits at position {pos}: max |mor - ref| / max |ref| = {:.2e}", err / scale);
        assert!(err / scale < 1e-4, "position {pos}: max |dlogit| {err} (scale {scale})");
        let top = ids(&row["top20_ids"]);
        assert_eq!(mor_eval::scorer::argmax(&lg), top[0] as usize, "position {pos} argmax");
    }
    // Greedy continuations of five prompts.
    for g in r["greedy"].as_array().unwrap() {
        let prompt = g["prompt"].as_str().unwrap();
        let p = tok.encode(prompt).unwrap();
        assert_eq!(p, ids(&g["prompt_ids"]), "prompt ids of {prompt:?}");
        let want = ids(&g["ids"]);
        let margins: Vec<f64> = g["top2_margins"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let got = model.generate(&be, &p, want.len(), Sampler::Greedy, None, |_| {}).unwrap().ids;
        // Identical, except that a near-tie (top-2 margin < 1e-3 in the f64 reference) may flip.
        let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
        if let Some(i) = first_diff {
            assert!(margins[i] < 1e-3, "{prompt:?}: token {i} differs ({} vs {}), margin {}", got[i], want[i], margins[i]);
        }
        assert_eq!(tok.decode(&got).unwrap(), g["text"].as_str().unwrap(), "{prompt:?}");
    }
}

#[test]
fn smollm2_lambada_and_hellaswag_match_the_numpy_reference() {
    let Some(data) = common::eval_data() else { return };
    let Some((be, mut model, tok)) = load() else { return };
    let r = reference();
    // LAMBADA: the harness' documents, tokenisation, log-likelihoods and greedy flags.
    let lam = mor_eval::tasks::lambada(&data).unwrap();
    let refs = r["lambada"].as_array().unwrap();
    let mut reqs = Vec::new();
    for (i, want) in refs.iter().enumerate() {
        let (ctx, cont) = lam.docs[i].requests("").remove(0);
        let q = encode_pair(&tok as &dyn TextEncoder, &ctx, &cont).unwrap();
        assert_eq!(q.context, ids(&want["context_ids"]), "lambada {i} context ids");
        assert_eq!(q.continuation, ids(&want["continuation_ids"]), "lambada {i} continuation ids");
        reqs.push(q);
    }
    let mut scorer = ModelScorer::new(&be, &mut model, Routing::Threshold, 4);
    let got = scorer.score(&reqs).unwrap();
    for (i, (g, want)) in got.iter().zip(refs).enumerate() {
        let wl = want["ll"].as_f64().unwrap();
        assert!(ll_close(g.ll, wl), "lambada {i}: ll {} vs {wl}", g.ll);
        assert_eq!(g.is_greedy, want["is_greedy"].as_bool().unwrap(), "lambada {i} is_greedy");
    }
    assert!(got.iter().any(|g| g.is_greedy) && got.iter().any(|g| !g.is_greedy));
    let worst = got.iter().zip(refs).map(|(g, w)| (g.ll - w["ll"].as_f64().unwrap()).abs()).fold(0f64, f64::max);
    eprintln!("lambada: {} items, max |ll - ref| = {worst:.2e}", got.len());
    let mut worst_hs = 0f64;

    // HellaSwag: preprocessing, requests, lls, acc and acc_norm.
    let hs = mor_eval::tasks::hellaswag(&data).unwrap();
    for (i, want) in r["hellaswag"].as_array().unwrap().iter().enumerate() {
        let Doc::Choice { query, choices, gold, .. } = &hs.docs[i] else { panic!() };
        assert_eq!(query, want["query"].as_str().unwrap(), "hellaswag {i} query");
        let wc: Vec<&str> = want["choices"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        assert_eq!(choices, &wc, "hellaswag {i} choices");
        assert_eq!(*gold as u64, want["gold"].as_u64().unwrap());
        let reqs = mor_eval::task::doc_token_requests(&tok, &hs.docs[i], "").unwrap();
        let wr = want["requests"].as_array().unwrap();
        for (q, w) in reqs.iter().zip(wr) {
            assert_eq!(q.context, ids(&w["context_ids"]));
            assert_eq!(q.continuation, ids(&w["continuation_ids"]));
        }
        let res = scorer.score(&reqs).unwrap();
        for (j, (g, w)) in res.iter().zip(wr).enumerate() {
            let wl = w["ll"].as_f64().unwrap();
            assert!(ll_close(g.ll, wl), "hellaswag {i} choice {j}: ll {} vs {wl}", g.ll);
            worst_hs = worst_hs.max((g.ll - wl).abs());
        }
        let s = score_doc(&hs.docs[i], &res);
        assert_eq!(s.acc, want["acc"].as_f64().unwrap(), "hellaswag {i} acc");
        assert_eq!(s.acc_norm.unwrap(), want["acc_norm"].as_f64().unwrap(), "hellaswag {i} acc_norm");
    }
    eprintln!("hellaswag: max |ll - ref| = {worst_hs:.2e}");
}
