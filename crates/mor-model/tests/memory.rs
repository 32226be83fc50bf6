//! The dry-run memory estimate counts exactly the buffers a training step allocates.

mod common;

use common::*;
use mor_config::{presets, RouterKind};
use mor_engine::{Backend, Cpu};
use mor_model::{memory, Batch, Model, Routing};

#[test]
fn memory_estimate_matches_the_workspace_of_a_training_step() {
    let be = Cpu::<f32>::new();
    let (bsz, len) = (2usize, 12usize);
    for (name, cfg) in variants() {
        for chunk in [mor_model::DEFAULT_HEAD_CHUNK_ELEMS, 5 * cfg.vocab_size] {
            let mut model = Model::new(&be, cfg.clone(), 3).unwrap();
            model.head_chunk_elems = chunk;
            let inputs = tokens(bsz * len, cfg.vocab_size, 1);
            let targets = tokens(bsz * len, cfg.vocab_size, 2);
            let batch = Batch { inputs: &inputs, targets: &targets, batch: bsz, seq_len: len, doc_starts: None };
            model.forward(&be, &batch, Routing::TopK, true, 1.0).unwrap();
            model.backward(&be).unwrap();
            let est = memory::estimate(&cfg, bsz, len, chunk).unwrap();
            let params: usize = model.params.info.iter().map(|i| i.numel()).sum();
            assert_eq!(est.params, params, "{name}: parameters");
            assert_eq!(est.activations(), model.workspace_elems(&be), "{name} (chunk {chunk}): workspace elements");
            // Expert-choice steps below capacity 1 keep fewer rows than the full batch.
            let full = cfg.num_layers * bsz * len;
            let expert = cfg.router.as_ref().is_some_and(|r| r.kind == RouterKind::Expert);
            if expert {
                assert!(est.layer_rows < full, "{name}: {} layer rows, not below {full}", est.layer_rows);
            } else {
                assert_eq!(est.layer_rows, full, "{name}: layer rows");
            }
        }
    }
}

/// The estimate for preset `name` at `bsz x len`, after checking it against the workspace of one
/// real training step (forward and backward) on the CPU.
fn measured_step(be: &Cpu<f32>, name: &str, bsz: usize, len: usize) -> memory::MemoryEstimate {
    let cfg = presets::load(name).unwrap().model;
    let mut model = Model::new(be, cfg.clone(), 1).unwrap();
    let inputs = tokens(bsz * len, cfg.vocab_size, 1);
    let targets = tokens(bsz * len, cfg.vocab_size, 2);
    let batch = Batch { inputs: &inputs, targets: &targets, batch: bsz, seq_len: len, doc_starts: None };
    model.forward(be, &batch, Routing::TopK, true, 1.0).unwrap();
    model.backward(be).unwrap();
    let est = memory::estimate(&cfg, bsz, len, mor_model::DEFAULT_HEAD_CHUNK_ELEMS).unwrap();
    assert_eq!(est.activations(), model.workspace_elems(be), "{name}");
    est
}

/// Activations of a MoR expert-choice model with N_r = 3 (capacities 1, 2/3, 1/3) against the
/// vanilla model of the same shape: measured on the tiny presets, estimated at 360M.
#[test]
fn mor_expert_choice_keeps_fewer_activations_than_vanilla() {
    let be = Cpu::<f32>::new();
    let (bsz, len) = (2usize, 48usize);
    let (van, ec3) = (measured_step(&be, "tiny-vanilla", bsz, len), measured_step(&be, "tiny-mor-ec3", bsz, len));
    // 8 layers: 2 unique ones on every token, 2 per recursion on 48, 32, 16 tokens per sequence.
    assert_eq!(van.layer_rows, 8 * 96);
    assert_eq!(ec3.layer_rows, 2 * 96 + 2 * (96 + 64 + 32));
    assert!(ec3.layer_activations * 4 <= van.layer_activations * 3, "{ec3:?} vs {van:?}");
    assert!(ec3.activations() < van.activations(), "{ec3:?} vs {van:?}");

    // 360M, 32 layers: 2 unique, 10 per recursion; the routers' buffers are small by comparison.
    let est = |name: &str, bsz: usize| {
        let cfg = presets::load(name).unwrap().model;
        memory::estimate(&cfg, bsz, 2048, mor_model::DEFAULT_HEAD_CHUNK_ELEMS).unwrap()
    };
    for bsz in [8, 16] {
        let (van, ec3) = (est("360m-vanilla", bsz), est("360m-mor-ec3", bsz));
        let n = bsz * 2048;
        assert_eq!(van.layer_rows, 32 * n);
        assert_eq!(ec3.layer_rows, 2 * n + 10 * bsz * (2048 + 1365 + 682));
        assert!(ec3.activations() * 4 < van.activations() * 3, "{bsz}: {ec3:?} vs {van:?}");
    }
}

/// With KV sharing, recursions after the first borrow recursion 1's keys/values: their layer
/// applications hold no k, v, and recursion 1's hold dk, dv for their gradients (measured on the
/// tiny preset, exact count at 360M); without it no application keeps dk, dv.
#[test]
fn kv_sharing_keeps_no_keys_and_values_for_borrowing_recursions() {
    let be = Cpu::<f32>::new();
    let (bsz, len) = (2usize, 48usize);
    let (own, share) = (measured_step(&be, "tiny-mor-ec3", bsz, len), measured_step(&be, "tiny-mor-ec3-share", bsz, len));
    let tiny = presets::load("tiny-mor-ec3").unwrap().model;
    let kvd = tiny.num_kv_heads * tiny.head_dim;
    // Recursions 2 and 3: 2 layer applications each, on 32 and 16 tokens per sequence, keep no
    // k, v; recursion 1's 2 applications on 48 tokens per sequence keep dk, dv for them.
    let kv_diff = |kvd: usize, later: usize, first: usize| (2 * kvd * later) as i64 - (2 * kvd * first) as i64;
    let diff = |a: &memory::MemoryEstimate, b: &memory::MemoryEstimate| a.layer_activations as i64 - b.layer_activations as i64;
    assert_eq!(diff(&own, &share), kv_diff(kvd, 2 * bsz * (32 + 16), 2 * bsz * 48));

    let cfg = |name: &str| presets::load(name).unwrap().model;
    let (own, share) = (cfg("360m-mor-ec3"), cfg("360m-mor-ec3-share"));
    let e = |c| memory::estimate(c, 8, 2048, mor_model::DEFAULT_HEAD_CHUNK_ELEMS).unwrap();
    let kvd = own.num_kv_heads * own.head_dim;
    assert_eq!(diff(&e(&own), &e(&share)), kv_diff(kvd, 10 * 8 * (1365 + 682), 10 * 8 * 2048));
}

/// Capacity warm-up starts at capacity 1: the first training step allocates full-size buffers
/// and the estimate counts them. A workspace sized by an earlier evaluation forward (final
/// capacities) grows to the same size, and the re-allocated buffers give the same gradients.
#[test]
fn workspace_grows_for_capacity_warmup() {
    let be = Cpu::<f32>::new();
    let (bsz, len) = (2usize, 12usize);
    let (_, mut cfg) = variants().into_iter().find(|(n, _)| n == "ec3-aux-router").unwrap();
    cfg.router.as_mut().unwrap().capacity_warmup = 3;
    let inputs = tokens(bsz * len, cfg.vocab_size, 1);
    let targets = tokens(bsz * len, cfg.vocab_size, 2);
    let batch = Batch { inputs: &inputs, targets: &targets, batch: bsz, seq_len: len, doc_starts: None };
    let est = memory::estimate(&cfg, bsz, len, mor_model::DEFAULT_HEAD_CHUNK_ELEMS).unwrap();
    assert_eq!(est.layer_rows, cfg.num_layers * bsz * len, "warm-up starts at capacity 1");

    let mut fresh = Model::new(&be, cfg.clone(), 3).unwrap();
    let mut grown = Model::new(&be, cfg.clone(), 3).unwrap();
    grown.forward(&be, &batch, Routing::TopK, false, 1.0).unwrap();
    let eval_elems = grown.workspace_elems(&be);
    assert!(eval_elems < est.activations(), "evaluation runs at the final capacities");
    for m in [&mut fresh, &mut grown] {
        m.forward(&be, &batch, Routing::TopK, true, 1.0).unwrap();
        m.backward(&be).unwrap();
        assert_eq!(m.workspace_elems(&be), est.activations());
    }
    assert_eq!(fresh.token_losses(), grown.token_losses());
    for (a, b) in fresh.params.grads.iter().zip(&grown.params.grads) {
        assert_eq!(be.to_f32(a), be.to_f32(b));
    }
    // Later steps select fewer tokens and reuse the buffers.
    for _ in 0..4 {
        grown.forward(&be, &batch, Routing::TopK, true, 1.0).unwrap();
        grown.backward(&be).unwrap();
    }
    assert_eq!(grown.workspace_elems(&be), est.activations());
}

#[test]
fn chunked_head_gives_the_same_losses() {
    let be = Cpu::<f32>::new();
    let (bsz, len) = (3usize, 10usize);
    for (name, cfg) in variants().into_iter().take(3) {
        let inputs = tokens(bsz * len, cfg.vocab_size, 5);
        let targets = tokens(bsz * len, cfg.vocab_size, 6);
        let batch = Batch { inputs: &inputs, targets: &targets, batch: bsz, seq_len: len, doc_starts: None };
        let mut losses = Vec::new();
        for chunk in [mor_model::DEFAULT_HEAD_CHUNK_ELEMS, 4 * cfg.vocab_size, cfg.vocab_size] {
            let mut model = Model::new(&be, cfg.clone(), 3).unwrap();
            model.head_chunk_elems = chunk;
            model.forward(&be, &batch, Routing::TopK, false, 1.0).unwrap();
            losses.push(model.token_losses().to_vec());
        }
        assert_eq!(losses[0], losses[1], "{name}");
        assert_eq!(losses[0], losses[2], "{name}");
    }
}
