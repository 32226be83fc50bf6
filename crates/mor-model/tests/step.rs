//! Training steps as `Model::train_step` runs them: the same results as `forward` then
//! `backward`, and, after a step at the same shape, nothing but device work between the batch's
//! upload and the statistics' collection (the condition for capturing the step in a CUDA graph,
//! docs/design/cuda-graphs.md), counted by the CPU backend's host-traffic counters.

mod common;

use common::*;
use mor_config::*;
use mor_engine::{Cpu, HostTraffic};
use mor_model::{Batch, Model, Reads, Routing};

/// A batch shape: rows, sequence length, document starts per row.
type Shape = (usize, usize, Option<Vec<Vec<u32>>>);

/// Batch shapes of a run: repeated (the token sets' buffers are reused), another shape, back,
/// and one with document masks (uploaded sets, host selections).
fn shapes() -> Vec<Shape> {
    vec![(2, 9, None), (2, 9, None), (3, 6, None), (2, 9, None), (2, 9, Some(vec![vec![4], vec![]])), (2, 9, None)]
}

#[test]
fn train_step_equals_forward_then_backward_for_every_variant() {
    let be = Cpu::<f64>::new();
    for (name, cfg) in variants() {
        let mut eager = Model::new(&be, cfg.clone(), 5).unwrap();
        let mut stepped = Model::new(&be, cfg.clone(), 5).unwrap();
        for (i, (bsz, len, docs)) in shapes().into_iter().enumerate() {
            let (inputs, targets) = (tokens(bsz * len, cfg.vocab_size, 10 + i as u64), tokens(bsz * len, cfg.vocab_size, 50 + i as u64));
            let batch = Batch { inputs: &inputs, targets: &targets, batch: bsz, seq_len: len, doc_starts: docs.as_deref() };
            let a = eager.forward(&be, &batch, Routing::TopK, true, 0.5).unwrap();
            let sel_a = eager.selections();
            eager.backward(&be).unwrap();
            // Reads queued in the step (train_step) or made after it, alternately.
            let b = if i % 2 == 0 {
                stepped.train_step(&be, &batch, 0.5).unwrap()
            } else {
                stepped.stage_batch(&be, &batch).unwrap();
                stepped.run_staged(&be, 0.5, Reads::AfterStep).unwrap();
                stepped.collect_stats(&be).unwrap()
            };
            let at = format!("{name}, batch {i} ({bsz} x {len}, masks: {})", docs.is_some());
            // Debug prints every f64 so that it reads back to the same bits.
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{at}: stats");
            assert_eq!(eager.token_losses(), stepped.token_losses(), "{at}: token losses");
            assert_eq!(eager.token_depths(), stepped.token_depths(), "{at}: depths");
            assert_eq!(sel_a, stepped.selections(), "{at}: selections");
            assert!(eager.params.grads == stepped.params.grads, "{at}: accumulated gradients differ");
        }
    }
}

#[test]
fn step_api_misuse_is_an_error() {
    let be = Cpu::<f64>::new();
    let cfg = variants().into_iter().find(|(n, _)| n == "ec3").unwrap().1;
    let mut m = Model::new(&be, cfg.clone(), 1).unwrap();
    assert!(m.collect_stats(&be).is_err(), "nothing ran");
    let (inputs, targets) = (tokens(18, cfg.vocab_size, 1), tokens(18, cfg.vocab_size, 2));
    let batch = Batch { inputs: &inputs, targets: &targets, batch: 2, seq_len: 9, doc_starts: None };
    m.train_step(&be, &batch, 1.0).unwrap();
    assert!(m.collect_stats(&be).is_err(), "collected twice");
    assert!(m.backward(&be).is_err(), "a second backward of the same forward");
    m.forward(&be, &batch, Routing::TopK, true, 1.0).unwrap();
    assert!(m.collect_stats(&be).is_err(), "an eager forward has its statistics already");
    m.stage_batch(&be, &batch).unwrap();
    assert!(m.run_staged(&be, 1.0, Reads::Eager).is_err(), "a step's reads cannot be eager");
    m.backward(&be).unwrap();
    assert!(m.backward(&be).is_err(), "a second backward of the same forward");
}

/// Host traffic of `run_staged` on the second batch of one shape.
fn staged_traffic(name: &str, cfg: &ModelConfig, docs: Option<&[Vec<u32>]>, reads: Reads) -> HostTraffic {
    let be = Cpu::<f32>::new();
    let mut m = Model::new(&be, cfg.clone(), 3).unwrap();
    let (bsz, len) = (2, 9);
    let mut traffic = HostTraffic::default();
    for step in 0..2u64 {
        let (inputs, targets) = (tokens(bsz * len, cfg.vocab_size, 7 + step), tokens(bsz * len, cfg.vocab_size, 70 + step));
        let batch = Batch { inputs: &inputs, targets: &targets, batch: bsz, seq_len: len, doc_starts: docs };
        m.params.zero_grads(&be);
        m.stage_batch(&be, &batch).unwrap();
        be.reset_traffic();
        m.run_staged(&be, 1.0, reads).unwrap();
        traffic = be.traffic();
        let stats = m.collect_stats(&be).unwrap();
        assert!(stats.loss.is_finite(), "{name}: loss {}", stats.loss);
    }
    traffic
}

#[test]
fn a_training_step_after_the_first_only_queues_device_work() {
    // Static steps: no document masks, and routers (if any) expert-choice with learned scores
    // (the fixtures have no capacity warm-up).
    let capturable = |name: &str, cfg: &ModelConfig| {
        !name.starts_with("tc") && !cfg.router.as_ref().is_some_and(|r| r.random)
    };
    let mut checked = 0;
    for (name, cfg) in variants() {
        let t = staged_traffic(&name, &cfg, None, Reads::AfterStep);
        if capturable(&name, &cfg) {
            assert_eq!(t, HostTraffic::default(), "{name}");
            let t = staged_traffic(&name, &cfg, None, Reads::Async);
            assert_eq!((t.allocs, t.uploads, t.reads), (0, 0, 0), "{name}, reads queued: {t:?}");
            checked += 1;
        } else {
            // The controls: token-choice routes on the host, the random router uploads its scores.
            assert!(t.uploads + t.reads > 0, "{name}: {t:?}");
        }
    }
    assert!(checked >= 12, "{checked} variants checked");
    // Reads of statistics are queued, never waited for inside the step.
    let ec3 = variants().into_iter().find(|(n, _)| n == "ec3-aux-router").unwrap().1;
    let t = staged_traffic("ec3-aux-router", &ec3, None, Reads::Async);
    assert!(t.async_reads >= 3 * 3, "selection, logits and aux BCE per recursion: {t:?}");
    // Document masks make the token sets data-dependent: uploaded each step.
    let masks = vec![vec![4u32], vec![]];
    let t = staged_traffic("ec3 with document masks", &ec3, Some(&masks), Reads::AfterStep);
    assert!(t.uploads > 0, "{t:?}");
}

#[test]
fn capture_says_what_stops_it() {
    let be = Cpu::<f32>::new();
    let find = |n: &str| variants().into_iter().find(|(name, _)| name == n).unwrap().1;
    let (bsz, len) = (2, 9);
    let blocker = |cfg: &ModelConfig, docs: Option<&[Vec<u32>]>, warm: bool| {
        let mut m = Model::new(&be, cfg.clone(), 2).unwrap();
        let (inputs, targets) = (tokens(bsz * len, cfg.vocab_size, 3), tokens(bsz * len, cfg.vocab_size, 4));
        let batch = Batch { inputs: &inputs, targets: &targets, batch: bsz, seq_len: len, doc_starts: docs };
        if warm {
            m.train_step(&be, &batch, 1.0).unwrap();
        }
        m.stage_batch(&be, &batch).unwrap();
        let why = m.capture_blocker();
        // Capturing fails with the reason, or (nothing in the way) because the CPU cannot record.
        let err = m.capture_step(&be, 1.0).err().expect("the CPU backend captures nothing").to_string();
        (why, err)
    };
    let masks = [vec![3u32], vec![]];
    for (name, docs, warm, expect) in [
        ("tc3", None, true, "token-choice"),
        ("ec3-random", None, true, "random router"),
        ("ec3", Some(&masks[..]), true, "document masks"),
        ("ec3", None, false, "no training step ran"),
    ] {
        let (why, err) = blocker(&find(name), docs, warm);
        assert!(why.as_deref().is_some_and(|w| w.contains(expect)), "{name}: {why:?}");
        assert!(err.contains(expect), "{name}: {err}");
    }
    let mut warming = find("ec3");
    warming.router.as_mut().unwrap().capacity_warmup = 5;
    let (why, _) = blocker(&warming, None, true);
    assert!(why.is_some_and(|w| w.contains("capacity warm-up")));
    for name in ["vanilla", "rec2-Cycle-kvshare", "ec3-aux-router"] {
        let (why, err) = blocker(&find(name), None, true);
        assert_eq!(why, None, "{name}");
        assert!(err.contains("cannot capture device work"), "{name}: {err}");
    }
}
