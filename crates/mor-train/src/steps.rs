//! Training micro-steps run eagerly or by replaying a CUDA graph of the forward and backward.
//!
//! [`StepRunner::step`] stages the batch, then replays the graph recorded for its shape, or
//! records one (the second step of a shape: [`Model::capture_blocker`] says when a step is
//! recordable), or runs the step eagerly; the statistics are collected after the step in every
//! case. A graph that no longer fits (the workspace was reallocated by an evaluation at another
//! shape, the capacities changed) is dropped and recorded again at the next recordable step.

use anyhow::Result;
use mor_engine::Backend;
use mor_model::{Batch, CapturedStep, Model, Reads, Stats};

pub struct StepRunner {
    graphs: bool,
    graph: Option<(CapturedStep, f32)>,
    /// Graphs recorded and steps replayed so far.
    pub captures: usize,
    pub replays: usize,
}

impl StepRunner {
    /// `graphs`: record and replay CUDA graphs where the backend and the step allow it.
    pub fn new(graphs: bool) -> Self {
        StepRunner { graphs, graph: None, captures: 0, replays: 0 }
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
                    return model.collect_stats(b);
                }
            }
            self.graph = None;
            if model.capture_blocker().is_none() {
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
