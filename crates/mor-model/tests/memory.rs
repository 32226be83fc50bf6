//! The dry-run memory estimate counts exactly the buffers a training step allocates.

mod common;

use common::*;
use mor_engine::Cpu;
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
        }
    }
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
