//! Training steps run eagerly or by replaying CUDA graphs: [`StepRunner`] for each micro-step's
//! forward and backward, [`OptimizerRunner`] for the optimizer step.
//!
//! [`StepRunner::step`] stages the batch, then replays the graph recorded for its shape, or
//! records one (the second step of a shape: [`Model::capture_blocker`] says when a step is
//! recordable), or runs the step eagerly; the statistics are collected after the step in every
//! case. A graph that no longer fits (the workspace was reallocated by an evaluation at another
//! shape, the capacities changed) is dropped and recorded again at the next recordable step.

use anyhow::{Context, Result};
use mor_engine::{Backend, ParamStore, StepGraph};
use mor_model::{Batch, CapturedStep, Model, Reads, Stats};

use crate::optim::{AdamW, StepStats};

pub struct StepRunner {
    graphs: bool,
    graph: Option<(CapturedStep, f32)>,
    /// Graphs recorded and steps replayed so far.
    pub captures: usize,
    pub replays: usize,
    /// With graphs: why the last micro-step ran eagerly ([`Model::capture_blocker`]); `None`
    /// when it was replayed.
    pub last_eager: Option<String>,
}

impl StepRunner {
    /// `graphs`: record and replay CUDA graphs where the backend and the step allow it.
    pub fn new(graphs: bool) -> Self {
        StepRunner { graphs, graph: None, captures: 0, replays: 0, last_eager: None }
    }

    /// One forward and backward of `batch`, gradients accumulated into the model's.
    pub fn step<B: Backend>(&mut self, b: &B, model: &mut Model<B>, batch: &Batch, loss_scale: f32) -> Result<Stats> {
        model.stage_batch(b, batch)?;
        if self.graphs {
            // The loss scale is part of the recording.
            let fits = |(_, scale): &(CapturedStep, f32)| *scale == loss_scale;
            if let Some((graph, _)) = self.graph.as_ref().filter(|g| fits(g)) {
                if model.replay_step(graph).is_ok() {
                    self.replays += 1;
                    self.last_eager = None;
                    return model.collect_stats(b);
                }
            }
            self.graph = None;
            self.last_eager = model.capture_blocker();
            if self.last_eager.is_none() {
                let graph = model.capture_step(b, loss_scale)?;
                model.replay_step(&graph)?;
                self.graph = Some((graph, loss_scale));
                self.captures += 1;
                self.replays += 1;
                return model.collect_stats(b);
            }
        }
        model.run_staged(b, loss_scale, Reads::Async)?;
        model.collect_stats(b)
    }
}

/// The optimizer step (the main group, and the aux routers' when they are trained) eagerly
/// ([`AdamW::step`]) or, with graphs, as [`AdamW::stage`] + a replay of the recorded
/// [`AdamW::update`]s + [`AdamW::finish`]: the update is recorded at its second call (the first
/// uploads the kernels' tensor tables) and recorded again after a launch is refused.
pub struct OptimizerRunner {
    graphs: bool,
    graph: Option<Box<dyn StepGraph>>,
    warm: bool,
}

impl OptimizerRunner {
    pub fn new(graphs: bool) -> Self {
        OptimizerRunner { graphs, graph: None, warm: false }
    }

    /// One step at scheduled learning rate `lr`; the aux group's stats when it runs.
    pub fn step<B: Backend>(
        &mut self,
        b: &B,
        params: &mut ParamStore<B>,
        main: &mut AdamW<B>,
        mut aux: Option<&mut AdamW<B>>,
        lr: f64,
    ) -> Result<(StepStats, Option<StepStats>)> {
        if !self.graphs {
            let st = main.step(b, params, lr);
            return Ok((st, aux.map(|a| a.step(b, params, lr))));
        }
        main.stage(b, lr);
        if let Some(a) = aux.as_deref_mut() {
            a.stage(b, lr);
        }
        let launched = self.graph.as_ref().is_some_and(|g| g.launch().is_ok());
        if !launched {
            let record = std::mem::take(&mut self.graph).is_none() && self.warm;
            if record {
                b.capture_begin().map_err(anyhow::Error::msg).context("recording the optimizer step")?;
            }
            main.update(b, params);
            if let Some(a) = aux.as_deref_mut() {
                a.update(b, params);
            }
            if record {
                let graph = b.capture_end().map_err(anyhow::Error::msg).context("recording the optimizer step")?;
                graph.launch().map_err(anyhow::Error::msg)?;
                self.graph = Some(graph);
            }
            // A refused launch (reallocated tables) runs eagerly once before the next recording.
            self.warm = true;
        }
        let st = main.finish(b);
        Ok((st, aux.map(|a| a.finish(b))))
    }
}
