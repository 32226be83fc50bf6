//! The training loop: a tiny MoR expert-choice model learns, and resuming after a kill
//! reproduces the uninterrupted run bit for bit.

use anyhow::Result;
use mor_config::RunConfig;
use mor_engine::Cpu;
use mor_train::{train, BatchSource, TokenBatch, TrainOptions};
use serde_json::{json, Value};

/// A deterministic stream with learnable structure: rows follow a fixed random bigram map
/// from a random start token.
struct Motifs {
    vocab: u32,
    next_row: u64,
}

impl BatchSource for Motifs {
    fn next_batch(&mut self, batch: usize, seq_len: usize) -> Result<TokenBatch> {
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..batch {
            let mut t = (self.next_row.wrapping_mul(0x9E3779B97F4A7C15) >> 40) as u32 % self.vocab;
            let row: Vec<u32> = (0..=seq_len)
                .map(|_| {
                    let cur = t;
                    t = (cur * 37 + 11) % self.vocab;
                    cur
                })
                .collect();
            inputs.extend_from_slice(&row[..seq_len]);
            targets.extend_from_slice(&row[1..]);
            self.next_row += 1;
        }
        Ok(TokenBatch { inputs, targets, batch, seq_len, doc_starts: vec![vec![]; batch] })
    }
    fn state(&self) -> Value {
        json!({ "next_row": self.next_row })
    }
    fn restore(&mut self, state: &Value) -> Result<()> {
        self.next_row = state["next_row"].as_u64().ok_or_else(|| anyhow::anyhow!("bad data state"))?;
        Ok(())
    }
}

fn config(steps: usize) -> RunConfig {
    let mut cfg = mor_config::load("tiny-mor-ec3").unwrap();
    cfg.model.vocab_size = 64;
    cfg.model.hidden_size = 32;
    cfg.model.num_heads = 2;
    cfg.model.num_kv_heads = 1;
    cfg.model.head_dim = 16;
    cfg.model.intermediate_size = 64;
    cfg.train.seq_len = 24;
    cfg.train.micro_batch = 4;
    cfg.train.grad_accum = 2;
    cfg.train.steps = steps;
    cfg.train.warmup_steps = 3;
    cfg.train.checkpoint_every = 0;
    cfg
}

fn opts(dir: &std::path::Path, resume: bool, stop_after: Option<usize>) -> TrainOptions {
    TrainOptions { resume, quiet: true, stop_after, ..TrainOptions::new(dir) }
}

#[test]
fn tiny_mor_loss_falls() {
    let be = Cpu::<f32>::new();
    let dir = tempfile::tempdir().unwrap();
    let out = train(&be, &config(40), &mut Motifs { vocab: 64, next_row: 0 }, &opts(dir.path(), false, None)).unwrap();
    let first: f64 = out.log[..5].iter().map(|l| l.ce).sum::<f64>() / 5.0;
    let last: f64 = out.log[35..].iter().map(|l| l.ce).sum::<f64>() / 5.0;
    assert!(last < first - 1.0, "loss did not fall: {first} -> {last}");
    assert!(out.metrics.is_file() && out.checkpoint.join("model.safetensors").is_file());
    assert!(out.plot.as_ref().is_some_and(|p| p.is_file()));
}

#[test]
fn resume_after_kill_reproduces_uninterrupted_run() {
    let be = Cpu::<f32>::new();
    let cfg = config(12);
    let full_dir = tempfile::tempdir().unwrap();
    let full = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &opts(full_dir.path(), false, None)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let first = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &opts(dir.path(), false, Some(5))).unwrap();
    assert_eq!(first.steps_done, 5);
    // A fresh process: new data source at its start; the checkpoint restores the position.
    let rest = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &opts(dir.path(), true, None)).unwrap();
    assert_eq!(rest.steps_done, 12);
    let resumed: Vec<f64> = first.log.iter().chain(&rest.log).map(|l| l.loss).collect();
    let uninterrupted: Vec<f64> = full.log.iter().map(|l| l.loss).collect();
    assert_eq!(resumed, uninterrupted, "losses differ after resume");
    for id in full.model.params.ids() {
        assert_eq!(full.model.params.values[id.0], rest.model.params.values[id.0]);
    }
}

#[test]
fn resume_refuses_a_different_model() {
    let be = Cpu::<f32>::new();
    let dir = tempfile::tempdir().unwrap();
    train(&be, &config(3), &mut Motifs { vocab: 64, next_row: 0 }, &opts(dir.path(), false, None)).unwrap();
    let mut other = config(6);
    other.model.intermediate_size = 96;
    let err = train(&be, &other, &mut Motifs { vocab: 64, next_row: 0 }, &opts(dir.path(), true, None)).err().unwrap();
    assert!(format!("{err:#}").contains("different model config"), "{err:#}");
}

#[test]
fn steps_fitting_counts_the_steps_left_in_the_time() {
    use mor_train::trainer::steps_fitting;
    assert_eq!(steps_fitting(10, 100.0, 1.0, 1000), 10 + 99); // 1 % slack
    assert_eq!(steps_fitting(10, 100.0, 1.0, 50), 50); // never past the config's steps
    assert_eq!(steps_fitting(10, -5.0, 1.0, 1000), 10); // out of time: stop now
    assert_eq!(steps_fitting(10, 100.0, 0.0, 1000), 1000); // no measurement yet
    assert_eq!(steps_fitting(10, 1e300, 1e-300, usize::MAX), usize::MAX);
}

/// A time limit far below what `steps` needs: the run stops early but ends like a full one.
#[test]
fn time_limit_stops_cleanly_with_checkpoint_metrics_and_plot() {
    let be = Cpu::<f32>::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1_000_000);
    let o = TrainOptions { time_limit: Some(std::time::Duration::from_millis(1500)), ..opts(dir.path(), false, None) };
    let t0 = std::time::Instant::now();
    let out = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &o).unwrap();
    let took = t0.elapsed().as_secs_f64();
    assert!(out.steps_done >= 1 && out.steps_done < 1_000_000, "steps {}", out.steps_done);
    assert!(took < 10.0, "took {took:.1} s for a 1.5 s limit");
    assert!(out.checkpoint.join("model.safetensors").is_file());
    assert!(out.plot.as_ref().is_some_and(|p| p.is_file()));
    let records = mor_train::metrics::read_metrics(&out.metrics).unwrap();
    assert_eq!(records.last().unwrap().step, out.steps_done as u64, "the last step is logged");
    // The checkpoint is resumable: a second time-limited call continues after it.
    let o2 = TrainOptions { resume: true, time_limit: Some(std::time::Duration::from_millis(300)), ..opts(dir.path(), false, None) };
    let more = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &o2).unwrap();
    assert!(more.steps_done > out.steps_done);
}

/// `fit_schedule`: the WSD cool-down happens inside the time limit. Steps count as 10 ms each
/// (`step_time_override`), so the decisions do not depend on the machine's load: 2 s fit ~198
/// steps, and the fitted run ends its schedule (the last LR is the cool-down's last, 1/D of the
/// peak) without running out of time.
#[test]
fn fit_schedule_completes_the_cooldown_within_the_time_limit() {
    let be = Cpu::<f32>::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1_000_000);
    let step = std::time::Duration::from_millis(10);
    let limit = std::time::Duration::from_millis(2000);
    let o = TrainOptions { time_limit: Some(limit), fit_schedule: true, step_time_override: Some(step), ..opts(dir.path(), false, None) };
    let out = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &o).unwrap();
    assert!((190..=200).contains(&out.steps_done), "steps {}", out.steps_done);
    let peak = cfg.train.lr;
    let last = out.log.last().unwrap();
    let fitted = mor_train::LrSchedule::from_config(&mor_config::TrainConfig { steps: out.steps_done, ..cfg.train.clone() });
    eprintln!("fitted run: {} steps, last LR {:.3e} of peak {peak:.1e}", out.steps_done, last.lr);
    assert!(fitted.decay_steps > 10, "{fitted:?}");
    assert!((last.lr - fitted.lr(out.steps_done - 1)).abs() <= 1e-12 * peak, "the schedule did not end: last LR {} of peak {peak}", last.lr);
    assert!(last.lr < 0.1 * peak, "no cool-down: last LR {} of peak {peak}", last.lr);
    assert!(out.log.iter().any(|l| l.lr == peak), "the stable phase runs at the peak LR");

    // Without fitting, the same limit stops the unshortened schedule in its stable phase.
    let dir2 = tempfile::tempdir().unwrap();
    let o2 = TrainOptions { time_limit: Some(limit), step_time_override: Some(step), ..opts(dir2.path(), false, None) };
    let plain = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &o2).unwrap();
    assert!((190..=200).contains(&plain.steps_done), "steps {}", plain.steps_done);
    assert_eq!(plain.log.last().unwrap().lr, peak);
}

/// An evaluator runs every `every` steps and after the last, is logged as `val_loss`, and leaves
/// the training itself bit for bit unchanged.
#[test]
fn evaluator_logs_val_loss_without_changing_training() {
    let be = Cpu::<f32>::new();
    let cfg = config(7);
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &opts(plain_dir.path(), false, None)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut held_out = Motifs { vocab: 64, next_row: 1 << 20 };
    let b = held_out.next_batch(2, 24).unwrap();
    let ev = mor_train::Evaluator::<Cpu<f32>> {
        every: 3,
        eval: Box::new(move |be: &Cpu<f32>, m: &mut mor_model::Model<Cpu<f32>>| {
            let batch = mor_model::Batch { inputs: &b.inputs, targets: &b.targets, batch: b.batch, seq_len: b.seq_len, doc_starts: None };
            Ok(m.forward(be, &batch, mor_model::Routing::TopK, false, 1.0)?.ce)
        }),
    };
    let out = mor_train::train_with_eval(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &opts(dir.path(), false, None), Some(ev)).unwrap();
    assert_eq!(out.val_log.iter().map(|v| v.0).collect::<Vec<_>>(), vec![3, 6, 7]);
    assert!(out.val_log.iter().all(|v| v.1.is_finite()));
    let losses = |o: &mor_train::TrainOutcome<Cpu<f32>>| o.log.iter().map(|l| l.loss).collect::<Vec<_>>();
    assert_eq!(losses(&out), losses(&plain), "evaluation changed the training");
    let records = mor_train::metrics::read_metrics(&out.metrics).unwrap();
    let logged: Vec<u64> = records.iter().filter(|r| r.get_f64("val_loss").is_some()).map(|r| r.step).collect();
    assert_eq!(logged, vec![3, 6, 7]);
}

/// `--cuda-graph` on a backend that cannot record: the first step runs eagerly, the second (the
/// first recordable one) fails with the backend's reason; without it the run is unchanged.
#[test]
fn cuda_graph_on_the_cpu_is_refused_at_the_first_recordable_step() {
    let be = Cpu::<f32>::new();
    let mut cfg = config(3);
    cfg.model.router.as_mut().unwrap().capacity_warmup = 0;
    let dir = tempfile::tempdir().unwrap();
    let o = TrainOptions { cuda_graph: true, ..opts(dir.path(), false, None) };
    let err = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &o).err().expect("the CPU records no graphs");
    assert!(format!("{err:#}").contains("cannot capture device work"), "{err:#}");
}
