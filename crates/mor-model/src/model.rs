//! The whole model: embedding → unique prefix layer(s) → recursion steps (plain, expert-choice
//! or token-choice) → unique suffix layer(s) → final norm → LM head + cross-entropy.
//!
//! A forward pass records a [`Trace`] (token sets, selections, which saved activations belong
//! to which layer application); the backward pass walks it in reverse. Buffers live in a
//! [`Workspace`] allocated for the batch shape and reused across steps.

use crate::layer::{layer_backward, layer_forward, Dims, KvGrad, KvRole, LayerAct, LayerScratch, SharedKv};
use crate::router::{router_backward, router_forward, RouterAct};
use crate::tokens::{Segments, TokenSet};
use crate::weights::Weights;
use mor_config::{
    capacity_tokens, warmed_capacity, Balancing, Combine, KvMode, ModelConfig, RouterActivation, RouterConfig,
    RouterKind, Sampling, SharingMap,
};
use mor_engine::cpu::math::bce_with_logits;
use mor_engine::{Backend, GateFn, ParamStore, Readback, StepGraph};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// How expert-choice routers select tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Top-k per sequence (training; non-causal at evaluation: it sees future tokens' scores).
    TopK,
    /// Per-token decision `sigmoid(logit) >= 0.5` (causal; inference).
    Threshold,
}

/// One batch of token rows.
pub struct Batch<'a> {
    pub inputs: &'a [u32],
    /// Next-token targets; `u32::MAX` marks positions without a target.
    pub targets: &'a [u32],
    pub batch: usize,
    pub seq_len: usize,
    /// Per row, offsets where a new document starts (document masking); `None`: whole rows.
    pub doc_starts: Option<&'a [Vec<u32>]>,
}

/// Router statistics of one recursion step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecursionStats {
    /// Fraction of all tokens active at this recursion.
    pub selected_fraction: f64,
    /// Expert-choice: agreement of `sigmoid(logit) >= 0.5` with the top-k selection.
    pub sampling_accuracy: Option<f64>,
    /// Expert-choice: mean BCE aux loss of this step.
    pub bce: Option<f64>,
}

/// Losses and router statistics of one forward pass.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Mean token cross-entropy.
    pub ce: f64,
    pub tokens: usize,
    /// The training objective: `ce + Σ coeff · aux` (all coefficients relative to mean CE).
    pub loss: f64,
    /// Expert-choice BCE aux loss summed over steps (unweighted).
    pub aux_bce: f64,
    /// Aux-router BCE (trained by its own optimizer; not part of `loss`).
    pub aux_router_bce: f64,
    /// Router z-loss (unweighted).
    pub z_loss: f64,
    /// Token-choice balancing loss (unweighted).
    pub balance_loss: f64,
    pub recursions: Vec<RecursionStats>,
    /// Expert-choice: fraction of positions never selected at the last recursion in this batch.
    pub dead_token_ratio: Option<f64>,
    /// Token-choice: MaxVio of depth loads and entropy of mean routing probabilities.
    pub max_vio: Option<f64>,
    pub entropy: Option<f64>,
}

/// Router state that must survive checkpoints for exact resume.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RouterState {
    /// Training forward calls so far (capacity warm-up, random-router stream).
    pub forward_calls: u64,
    /// Token-choice loss-free bias per depth.
    pub bias: Vec<f64>,
    /// Depth loads accumulated since the last optimizer step.
    pub load_sum: Vec<f64>,
    pub load_batches: u64,
}

/// One layer application in a forward pass; activation slot = its index.
#[derive(Debug, Clone)]
struct App {
    pos: usize,
    set: usize,
    /// Application whose keys/values this one attends to (KV sharing).
    kv_src: Option<usize>,
}

enum StepTrace<B: Backend> {
    /// Every token of `set` runs the block; the block output replaces the stream.
    Plain { apps: Range<usize> },
    Expert(ExpertTrace),
    Token(TokenTrace<B>),
}

struct ExpertTrace {
    r: usize,
    apps: Range<usize>,
    cand: usize,
    sel: usize,
    /// Step buffer (its `sel_local`: the selected candidates as local indices into `cand`).
    buf: usize,
    has_router: bool,
}

struct TokenTrace<B: Backend> {
    /// Per recursion: active set, its block applications, and the exit / continue split.
    steps: Vec<TokenStep<B>>,
    /// Host copies for the router backward.
    depth: Vec<usize>,
    probs: Vec<f64>,
    logits: Vec<f64>,
}

struct TokenStep<B: Backend> {
    apps: Range<usize>,
    set: usize,
    exit_local: B::Idx,
    exit_global: B::Idx,
    n_exit: usize,
    cont_local: B::Idx,
    cont_global: B::Idx,
    n_cont: usize,
    buf: usize,
}

/// Per recursion-step buffers: `x`, `g`, `targets`, `bce`, `dg`, `dx` hold one row per
/// candidate token (the router's input), the others one row per selected token.
struct StepBuf<B: Backend> {
    cand: usize,
    sel: usize,
    /// The selection as local indices into the candidates (top-k's output).
    sel_local: B::Idx,
    x: B::Buf,
    g: B::Buf,
    gk: B::Buf,
    y: B::Buf,
    ye: B::Buf,
    targets: B::Buf,
    bce: B::Buf,
    dy: B::Buf,
    dyin: B::Buf,
    dgk: B::Buf,
    dg: B::Buf,
    dx: B::Buf,
}

impl<B: Backend> StepBuf<B> {
    fn new(b: &B, cand: usize, sel: usize, d: usize) -> Self {
        StepBuf {
            cand,
            sel,
            sel_local: b.idx_from(&vec![0; sel]),
            x: b.zeros(cand * d),
            g: b.zeros(cand),
            gk: b.zeros(sel),
            y: b.zeros(sel * d),
            ye: b.zeros(sel * d),
            targets: b.zeros(cand),
            bce: b.zeros(cand),
            dy: b.zeros(sel * d),
            dyin: b.zeros(sel * d),
            dgk: b.zeros(sel),
            dg: b.zeros(cand),
            dx: b.zeros(cand * d),
        }
    }
}

/// Buffers for one batch shape, reused across steps.
///
/// Buffers of the whole stream (residual, scratch, head chunk) hold all `n` tokens. Per layer
/// application (`acts`, index = application) and per recursion step (`steps`, `routers`,
/// `aux_routers`, index = step) the buffers hold only the rows that application or step needs,
/// allocated when a forward first reaches it and re-allocated only when a later forward needs
/// more rows (`ensure_slot`):
/// - expert-choice top-k: `batch · k_r` selected rows, `k_r` from the step's capacity at the
///   current forward call. Capacity warm-up starts at capacity 1 and only decays, so the first
///   training step allocates the most the run will use and later steps reuse it (a run resumed
///   after the warm-up allocates only the final capacities).
/// - expert-choice threshold routing and token-choice: how many tokens reach a step depends on
///   the router at run time; any batch may send all `n` there, so these are sized `n` (the
///   bound a run must budget for anyway, and no re-allocation from batch to batch).
/// - layers outside the recursion blocks, and steps where every token runs: `n`.
///
/// [`crate::memory::estimate`] counts the same sizes for the first training step.
pub struct Workspace<B: Backend> {
    n: usize,
    acts: Vec<LayerAct<B>>,
    scratch: LayerScratch<B>,
    steps: Vec<StepBuf<B>>,
    routers: Vec<RouterAct<B>>,
    aux_routers: Vec<RouterAct<B>>,
    h: B::Buf,
    h1: B::Buf,
    tx: B::Buf,
    hn: B::Buf,
    rstd: B::Buf,
    dh: B::Buf,
    dhn: B::Buf,
    dtx: B::Buf,
    head_rows: usize,
    head_x: B::Buf,
    head_dx: B::Buf,
    logits: B::Buf,
    /// Allocated on the first training forward (evaluation never needs it).
    dlogits: Option<B::Buf>,
    /// Per-row cross-entropy of one head chunk.
    ce: B::Buf,
    /// Per-token cross-entropy of the whole batch (read back once per forward).
    ce_all: B::Buf,
    /// The batch's token ids, and per LM-head chunk its row indices (fixed) and targets: written
    /// per batch (`idx_write`), not allocated per step.
    ids: B::Idx,
    head_idx: Vec<B::Idx>,
    head_targets: Vec<B::Idx>,
    /// The token sets of the last finished forward, by their index in its trace: the next
    /// forward reuses their buffers where it builds the same kind of set ([`TokenSet::full`],
    /// [`TokenSet::compose_rows`]).
    set_pool: Vec<Option<TokenSet<B>>>,
}

/// What one forward pass did, for the backward.
pub struct Trace<B: Backend> {
    segs: Segments,
    sets: Vec<TokenSet<B>>,
    apps: Vec<App>,
    steps: Vec<StepTrace<B>>,
    prefix: Range<usize>,
    suffix: Range<usize>,
    loss_scale: f32,
    /// Expert-choice selections composed on the device, read back for the statistics.
    pending: Vec<PendingSelection>,
    /// How the statistics' reads are done; with [`Reads::Eager`] the forward did them.
    reads: Reads,
    /// Statistics known when the forward was queued (host-side), completed by the reads.
    stats: Stats,
    /// The per-token losses in flight ([`Reads::Async`]).
    ce_read: Option<Readback<f64>>,
    backward_done: bool,
    /// [`Model::collect_stats`] ran for this forward.
    collected: bool,
    /// The [`CapturedStep`] this trace was recorded for: kept (never recycled) while the
    /// graph may replay it.
    capture_id: Option<u64>,
}

/// A training step recorded for replay ([`Model::capture_step`]): the device work of
/// [`Model::run_staged`] with [`Reads::AfterStep`] for one batch shape, as a backend graph.
pub struct CapturedStep {
    graph: Box<dyn StepGraph>,
    id: u64,
    batch: usize,
    seq_len: usize,
    /// Targets that count: the loss scale `loss_scale / valid` is part of the recording.
    valid: usize,
    /// Tokens per row of each expert-choice recursion (grids and sizes are recorded).
    ks: Vec<usize>,
    /// The workspace the recording uses ([`Model`]'s generation counter).
    generation: u64,
}

/// When a forward's statistics (per-token losses, expert-choice selections and router logits)
/// come back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// Inside the forward: [`Model::forward`] returns complete statistics.
    Eager,
    /// Queued asynchronously in the forward, waited for by [`Model::collect_stats`] after the
    /// backward is queued: the host computes statistics while the device runs the backward.
    Async,
    /// Read by [`Model::collect_stats`] from the workspace after the step: the step itself holds
    /// no transfer at all (what a CUDA graph of the step replays).
    AfterStep,
}

/// An expert-choice selection composed on the device (in step buffer `r`, `rows` entries), for
/// the selected set's host copies and the router statistics ([`Model::expert_stats`]); with
/// [`Reads::Async`] its reads in flight.
struct PendingSelection {
    r: usize,
    cand: usize,
    sel: usize,
    rows: usize,
    logits: bool,
    aux_bce: bool,
    queued: Option<QueuedReads>,
}

struct QueuedReads {
    local: Readback<u32>,
    logits: Option<Readback<f64>>,
    aux_bce: Option<Readback<f64>>,
}

/// What a forward needs of the staged batch on the host (its ids and targets are on the device).
struct Staged {
    segs: Segments,
    /// Targets that count (not `u32::MAX`).
    valid: usize,
}

impl<B: Backend> Trace<B> {
    /// Whether a later application attends to application `i`'s keys/values (KV sharing).
    fn kv_borrowed(&self, i: usize) -> bool {
        self.apps.iter().any(|a| a.kv_src == Some(i))
    }
}

pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub map: SharingMap,
    pub dims: Dims,
    pub params: ParamStore<B>,
    pub weights: Weights,
    pub router_state: RouterState,
    seed: u64,
    ws: Option<Workspace<B>>,
    /// The batch of the next forward ([`Model::stage_batch`]).
    staged: Option<Staged>,
    /// The last forward (kept after its backward for [`Model::collect_stats`] and
    /// [`Model::selections`]; its token sets go to the workspace's pool at the next forward).
    trace: Option<Trace<B>>,
    /// The trace of the last [`CapturedStep`] while another forward is `trace`.
    captured_trace: Option<Trace<B>>,
    /// Bumped whenever workspace buffers are (re)allocated: a captured step records pointers.
    ws_generation: u64,
    captures: u64,
    /// When set, `captured` receives the residual stream after the embedding and after every
    /// step of the forward (the prefix layers, each recursion, the suffix layers): a hook for
    /// tests and analysis.
    pub capture: bool,
    pub captured: Vec<Vec<f32>>,
    token_losses: Vec<f64>,
    token_depths: Vec<u8>,
    /// Size (elements) of the logits buffer of one LM-head chunk: the head runs over
    /// `head_chunk_elems / vocab` token rows at a time, so the full logits never exist at once.
    /// Default [`default_head_chunk_elems`] of the backend. Takes effect at the next workspace
    /// allocation (a new batch shape).
    pub head_chunk_elems: usize,
}

/// Default [`Model::head_chunk_elems`] on the CPU.
pub const DEFAULT_HEAD_CHUNK_ELEMS: usize = 16 * 1024 * 1024;

/// Default [`Model::head_chunk_elems`] on the backend named `backend` ([`Backend::name`]): 16M on
/// the CPU; 192M on CUDA, 4096 rows at SmolLM's 49K vocabulary, where the LM-head GEMMs run at
/// full speed (360M vanilla on the H200: 1.7 ms per 8 x 2048 step faster than 1365 rows, for
/// 0.8 GiB more logits).
pub fn default_head_chunk_elems(backend: &str) -> usize {
    match backend {
        "cuda" => 192 << 20,
        _ => DEFAULT_HEAD_CHUNK_ELEMS,
    }
}

fn gate_fn(act: RouterActivation) -> GateFn {
    match act {
        RouterActivation::Sigmoid => GateFn::Sigmoid,
        RouterActivation::Tanh => GateFn::Tanh,
        RouterActivation::None => GateFn::Identity,
        RouterActivation::Softmax => unreachable!("softmax is token-choice only"),
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl<B: Backend> Model<B> {
    /// A freshly initialised model (N(0, init_std) matrices, unit norms).
    pub fn new(backend: &B, cfg: ModelConfig, seed: u64) -> anyhow::Result<Self> {
        cfg.validate()?;
        let map = match &cfg.recursion {
            Some(r) => SharingMap::new(r.sharing, cfg.num_layers, r.num_recursions)?,
            None => SharingMap::vanilla(cfg.num_layers),
        };
        if cfg.kv_mode() == KvMode::Share {
            let rec = cfg.recursion.as_ref().expect("kv share needs recursion");
            anyhow::ensure!(
                matches!(rec.sharing, mor_config::Sharing::Cycle | mor_config::Sharing::MiddleCycle),
                "model.recursion.kv_mode: KV sharing needs cycle or middle_cycle sharing"
            );
            if let Some(rc) = &cfg.router {
                anyhow::ensure!(
                    rc.kind == RouterKind::Token || rc.capacity(0, rec.num_recursions) >= 1.0,
                    "model.router.capacities: KV sharing needs capacity 1.0 at the first recursion"
                );
            }
        }
        let mut params = ParamStore::new();
        let weights = Weights::build(backend, &cfg, &map, seed, &mut params);
        let n_r = map.num_recursions;
        Ok(Model {
            dims: Dims::new(&cfg),
            router_state: RouterState { bias: vec![0.0; n_r], load_sum: vec![0.0; n_r], ..Default::default() },
            cfg,
            map,
            params,
            weights,
            seed,
            ws: None,
            staged: None,
            trace: None,
            captured_trace: None,
            ws_generation: 0,
            captures: 0,
            capture: false,
            captured: Vec::new(),
            token_losses: Vec::new(),
            token_depths: Vec::new(),
            head_chunk_elems: default_head_chunk_elems(backend.name()),
        })
    }

    fn router_cfg(&self) -> Option<&RouterConfig> {
        self.cfg.router.as_ref()
    }

    fn ensure_workspace(&mut self, b: &B, n: usize) {
        let vocab = self.cfg.vocab_size;
        let head_rows = (self.head_chunk_elems / vocab).clamp(1, n);
        if self.ws.as_ref().is_some_and(|w| w.n == n && w.head_rows == head_rows) {
            return;
        }
        // Free the old buffers before allocating the new ones.
        self.ws = None;
        self.ws_generation += 1;
        let d = self.dims.d;
        self.ws = Some(Workspace {
            n,
            acts: Vec::new(),
            scratch: LayerScratch::new(b, &self.dims, n),
            steps: Vec::new(),
            routers: Vec::new(),
            aux_routers: Vec::new(),
            h: b.zeros(n * d),
            h1: b.zeros(n * d),
            tx: b.zeros(n * d),
            hn: b.zeros(n * d),
            rstd: b.zeros(n),
            dh: b.zeros(n * d),
            dhn: b.zeros(n * d),
            dtx: b.zeros(n * d),
            head_rows,
            head_x: b.zeros(head_rows * d),
            head_dx: b.zeros(head_rows * d),
            // Activation precision: the head GEMM's output (bf16 in CUDA's bf16 mode, as PyTorch's
            // autocast gives; the loss is computed from it in f32).
            logits: b.zeros_act(head_rows * vocab),
            dlogits: None,
            ce: b.zeros(head_rows),
            ce_all: b.zeros(n),
            ids: b.idx_from(&vec![0; n]),
            head_idx: (0..n).step_by(head_rows).map(|s| b.idx_from(&(s as u32..(s + head_rows).min(n) as u32).collect::<Vec<_>>())).collect(),
            head_targets: (0..n).step_by(head_rows).map(|s| b.idx_from(&vec![0; head_rows.min(n - s)])).collect(),
            set_pool: Vec::new(),
        });
    }

    /// Forward pass computing the loss; with `grad`, also the head gradient, ready for
    /// [`Model::backward`]. `loss_scale` multiplies every gradient (e.g. `1 / grad_accum`).
    pub fn forward(&mut self, b: &B, batch: &Batch, routing: Routing, grad: bool, loss_scale: f32) -> anyhow::Result<Stats> {
        self.stage_batch(b, batch)?;
        self.forward_staged(b, routing, grad, loss_scale, Reads::Eager)?;
        Ok(self.trace.as_ref().unwrap().stats.clone())
    }

    /// One training micro-step: forward (top-k routing) and backward of `batch`, gradients
    /// accumulated into `params.grads`. The same computation as `forward(.., TopK, true, ..)`
    /// then `backward`, with the same results; its reads of losses, selections and router
    /// logits are waited for after the backward is queued. It is [`Model::stage_batch`],
    /// [`Model::run_staged`] and [`Model::collect_stats`] in turn.
    pub fn train_step(&mut self, b: &B, batch: &Batch, loss_scale: f32) -> anyhow::Result<Stats> {
        self.stage_batch(b, batch)?;
        self.run_staged(b, loss_scale, Reads::Async)?;
        self.collect_stats(b)
    }

    /// Checks `batch` and uploads its token ids and targets into the workspace (allocated for
    /// its shape on first use): the only host-to-device traffic of a training step.
    pub fn stage_batch(&mut self, b: &B, batch: &Batch) -> anyhow::Result<()> {
        let (bsz, len) = (batch.batch, batch.seq_len);
        let n = bsz * len;
        anyhow::ensure!(batch.inputs.len() == n && batch.targets.len() == n, "batch: inputs/targets must have batch*seq_len tokens");
        anyhow::ensure!(len <= self.cfg.max_seq_len, "batch: seq_len {len} exceeds model.max_seq_len {}", self.cfg.max_seq_len);
        if let Some(&bad) = batch.inputs.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            anyhow::bail!("batch: token id {bad} is outside the vocabulary ({})", self.cfg.vocab_size);
        }
        if let Some(&bad) = batch.targets.iter().find(|&&t| t != u32::MAX && t as usize >= self.cfg.vocab_size) {
            anyhow::bail!("batch: target id {bad} is outside the vocabulary ({})", self.cfg.vocab_size);
        }
        self.ensure_workspace(b, n);
        let ws = self.ws.as_mut().unwrap();
        b.idx_write(&mut ws.ids, batch.inputs);
        for (c, start) in (0..n).step_by(ws.head_rows).enumerate() {
            let rows = ws.head_rows.min(n - start);
            b.idx_write(&mut ws.head_targets[c], &batch.targets[start..start + rows]);
        }
        let valid = batch.targets.iter().filter(|&&t| t != u32::MAX).count();
        self.staged = Some(Staged { segs: Segments::new(bsz, len, batch.doc_starts), valid });
        Ok(())
    }

    /// Forward and backward of the staged batch (top-k routing), statistics read as `reads`
    /// says ([`Reads::Async`] or [`Reads::AfterStep`]; then [`Model::collect_stats`]). After a
    /// step at the same shape, with no document masks, an expert-choice or router-free model and
    /// a learned router, it only queues device work: no allocation, upload or waiting read
    /// (docs/design/cuda-graphs.md; the CPU backend's traffic counters test it).
    pub fn run_staged(&mut self, b: &B, loss_scale: f32, reads: Reads) -> anyhow::Result<()> {
        anyhow::ensure!(reads != Reads::Eager, "run_staged: a training step's reads are Async or AfterStep");
        self.forward_staged(b, Routing::TopK, true, loss_scale, reads)?;
        self.backward(b)
    }

    /// The statistics of the last [`Model::run_staged`]: its reads (waited for, or made now)
    /// and the router statistics, per-token losses and depths computed from them on the host.
    pub fn collect_stats(&mut self, b: &B) -> anyhow::Result<Stats> {
        let mut tr = self.trace.take().ok_or_else(|| anyhow::anyhow!("collect_stats without a training step"))?;
        if tr.reads == Reads::Eager || !tr.backward_done || tr.collected {
            self.trace = Some(tr);
            anyhow::bail!("collect_stats without a training step (run_staged) whose statistics are still to collect");
        }
        let mut stats = tr.stats.clone();
        self.read_stats(b, &mut tr, &mut stats);
        tr.collected = true;
        self.trace = Some(tr);
        Ok(stats)
    }

    /// Why the training step of the staged batch cannot be recorded by [`Model::capture_step`]
    /// (`None`: it can): its shapes or host work must not depend on the data, and a step must
    /// have run at this shape just before (the recording may not allocate or upload).
    pub fn capture_blocker(&self) -> Option<String> {
        let Some(staged) = &self.staged else { return Some("no staged batch".into()) };
        let segs = &staged.segs;
        if segs.num_segments != segs.batch {
            return Some("document masks make the attention segments depend on the data".into());
        }
        if let Some(rc) = self.router_cfg() {
            if rc.kind == RouterKind::Token {
                return Some("token-choice routing assigns depths on the host".into());
            }
            if rc.random {
                return Some("the random router draws its scores on the host".into());
            }
            if (self.router_state.forward_calls as usize) < rc.capacity_warmup {
                return Some("the capacity warm-up changes the selection sizes every step".into());
            }
        }
        if self.capture {
            return Some("Model::capture reads the hidden states inside the step".into());
        }
        let n = segs.batch * segs.seq_len;
        let warm = self.trace.as_ref().is_some_and(|t| t.backward_done && t.capture_id.is_none() && t.sets[0].len() == n);
        if !warm {
            return Some("no training step ran at this shape just before (it allocates the step's buffers)".into());
        }
        None
    }

    /// Tokens per row of each expert-choice recursion of the next training forward (empty
    /// without an expert-choice router).
    fn expert_ks(&self, seq_len: usize) -> Vec<usize> {
        let n_r = self.map.num_recursions;
        match self.router_cfg().filter(|rc| rc.kind == RouterKind::Expert) {
            Some(rc) => (0..n_r).map(|r| expert_k(rc, r, n_r, seq_len, self.router_state.forward_calls as usize)).collect(),
            None => Vec::new(),
        }
    }

    /// Records the training step of the staged batch ([`Model::run_staged`] with
    /// [`Reads::AfterStep`]) as a backend graph without running it: [`Model::replay_step`] runs
    /// it, now and for later batches of the same shape (each staged first), then
    /// [`Model::collect_stats`]. See [`Model::capture_blocker`] for what can be recorded.
    pub fn capture_step(&mut self, b: &B, loss_scale: f32) -> anyhow::Result<CapturedStep> {
        if let Some(why) = self.capture_blocker() {
            anyhow::bail!("cannot capture this training step: {why}");
        }
        let staged = self.staged.as_ref().unwrap();
        let (batch, seq_len, valid) = (staged.segs.batch, staged.segs.seq_len, staged.valid);
        let ks = self.expert_ks(seq_len);
        let generation = self.ws_generation;
        // Pool the last step's token sets now: whatever the pool drops must not be freed inside
        // the recording (a free would become part of every replay).
        if let Some(old) = self.trace.take() {
            self.recycle(old);
        }
        b.capture_begin().map_err(anyhow::Error::msg)?;
        let run = self.run_staged(b, loss_scale, Reads::AfterStep);
        let graph = b.capture_end();
        run?;
        let graph = graph.map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.ws_generation == generation, "capture: the step allocated workspace buffers");
        // The recording pass counted a forward that has not run: each replay counts its own.
        self.router_state.forward_calls -= 1;
        self.captures += 1;
        let tr = self.trace.as_mut().unwrap();
        tr.capture_id = Some(self.captures);
        tr.collected = true;
        self.captured_trace = None;
        Ok(CapturedStep { graph, id: self.captures, batch, seq_len, valid, ks, generation })
    }

    /// Runs a [`CapturedStep`] on the staged batch (which must have its shape and as many
    /// counted targets); its statistics come from [`Model::collect_stats`] as after
    /// [`Model::run_staged`]. An error when the recording no longer fits (another shape,
    /// reallocated workspace, changed capacities, a newer capture): capture again.
    pub fn replay_step(&mut self, step: &CapturedStep) -> anyhow::Result<()> {
        let staged = self.staged.as_ref().ok_or_else(|| anyhow::anyhow!("replay_step without a staged batch"))?;
        let segs = &staged.segs;
        anyhow::ensure!(
            (segs.batch, segs.seq_len, segs.num_segments, staged.valid) == (step.batch, step.seq_len, step.batch, step.valid),
            "replay_step: the staged batch ({} x {}, {} segments, {} targets) is not the recorded one ({} x {}, {} targets)",
            segs.batch,
            segs.seq_len,
            segs.num_segments,
            staged.valid,
            step.batch,
            step.seq_len,
            step.valid
        );
        anyhow::ensure!(self.ws_generation == step.generation, "replay_step: the workspace was reallocated since the capture");
        anyhow::ensure!(self.expert_ks(step.seq_len) == step.ks, "replay_step: the expert-choice capacities changed since the capture");
        let ours = |t: &Option<Trace<B>>| t.as_ref().is_some_and(|t| t.capture_id == Some(step.id));
        if !ours(&self.trace) {
            anyhow::ensure!(ours(&self.captured_trace), "replay_step: a newer capture replaced this one");
            if let Some(old) = self.trace.take() {
                self.recycle(old);
            }
            self.trace = self.captured_trace.take();
        }
        step.graph.launch().map_err(anyhow::Error::msg)?;
        self.router_state.forward_calls += 1;
        self.trace.as_mut().unwrap().collected = false;
        Ok(())
    }

    /// The statistics of `tr` that come from its reads: the expert-choice selections (and the
    /// router statistics from them), then the per-token losses (waited for when queued, else read
    /// now) into `token_losses`, their mean into `stats.ce` and the loss, and the depths.
    fn read_stats(&mut self, b: &B, tr: &mut Trace<B>, stats: &mut Stats) {
        self.expert_stats(b, tr, stats);
        let ce = match tr.ce_read.take() {
            Some(read) => read.wait(),
            None => b.to_f64_prefix(&self.ws.as_ref().unwrap().ce_all, tr.sets[0].len()),
        };
        let valid = self.staged.as_ref().expect("a staged batch").valid;
        self.token_losses = ce;
        let total: f64 = self.token_losses.iter().sum();
        stats.tokens = valid;
        stats.ce = if valid > 0 { total / valid as f64 } else { 0.0 };
        stats.loss += stats.ce;
        self.token_depths = self.depths_of(tr);
    }

    /// A trace's token sets back to the workspace's pool, for the next forward.
    fn recycle(&mut self, tr: Trace<B>) {
        if let Some(ws) = self.ws.as_mut() {
            if ws.n == tr.sets[0].len() {
                ws.set_pool = tr.sets.into_iter().map(Some).collect();
            }
        }
    }

    /// The pooled token set `i` of the last forward, if any (see [`Workspace::set_pool`]).
    fn pooled_set(&mut self, i: usize) -> Option<TokenSet<B>> {
        self.ws.as_mut().and_then(|ws| ws.set_pool.get_mut(i).and_then(Option::take))
    }

    /// The forward of the staged batch, its statistics read as `reads` says (with
    /// [`Reads::Eager`] here, otherwise by [`Model::collect_stats`]).
    fn forward_staged(&mut self, b: &B, routing: Routing, grad: bool, loss_scale: f32, reads: Reads) -> anyhow::Result<()> {
        if let Some(old) = self.trace.take() {
            if old.capture_id.is_some() {
                self.captured_trace = Some(old);
            } else {
                self.recycle(old);
            }
        }
        let segs = self.staged.as_ref().ok_or_else(|| anyhow::anyhow!("forward without a staged batch"))?.segs.clone();
        let n = segs.batch * segs.seq_len;
        let reuse = self.pooled_set(0);
        let full = TokenSet::full(b, &segs, reuse);
        let mut tr = Trace {
            segs,
            sets: vec![full],
            apps: Vec::new(),
            steps: Vec::new(),
            prefix: 0..0,
            suffix: 0..0,
            loss_scale,
            pending: Vec::new(),
            reads,
            stats: Stats::default(),
            ce_read: None,
            backward_done: false,
            collected: false,
            capture_id: None,
        };
        let mut stats = Stats::default();
        let d = self.dims.d;

        {
            let ws = self.ws.as_mut().unwrap();
            b.embedding_fwd(&mut ws.h, self.params.value(self.weights.embed), &ws.ids, n, d);
        }
        self.captured.clear();
        self.capture_h(b);

        // Prefix (unique first layer of middle strategies, or every layer without recursion blocks).
        let blocks_contiguous = blocks_contiguous(&self.map);
        let prefix_end = if blocks_contiguous { self.map.prefix_len() } else { self.map.num_layers };
        tr.prefix = 0..prefix_end;
        if prefix_end > 0 {
            self.plain_block(b, &mut tr, 0..prefix_end, 0, None);
        }

        if blocks_contiguous {
            match self.router_cfg().map(|r| r.kind) {
                None => {
                    for r in 0..self.map.num_recursions {
                        let src = self.kv_sources(&tr, r);
                        self.plain_block(b, &mut tr, self.map.step_positions(r), 0, src);
                    }
                }
                Some(RouterKind::Expert) => self.expert_forward(b, &mut tr, routing, grad, &mut stats)?,
                Some(RouterKind::Token) => self.token_forward(b, &mut tr, grad, &mut stats)?,
            }
            let suffix = self.map.suffix_positions();
            tr.suffix = suffix.clone();
            if !suffix.is_empty() {
                self.plain_block(b, &mut tr, suffix, 0, None);
            }
        }

        self.head_forward(b, grad, loss_scale);
        match reads {
            // The selections' reads were queued when made and are waited for now, while the
            // device runs the head; then the losses.
            Reads::Eager => self.read_stats(b, &mut tr, &mut stats),
            Reads::Async => tr.ce_read = Some(b.to_f64_prefix_async(&self.ws.as_ref().unwrap().ce_all, n)),
            Reads::AfterStep => {}
        }
        if grad {
            self.router_state.forward_calls += 1;
        }
        tr.stats = stats;
        self.trace = Some(tr);
        Ok(())
    }

    /// KV-sharing sources for the applications of recursion `r` (`None` = own keys/values).
    fn kv_sources(&self, tr: &Trace<B>, r: usize) -> Option<Vec<usize>> {
        if self.cfg.kv_mode() != KvMode::Share || r == 0 {
            return None;
        }
        let first = self.map.step_positions(0);
        Some(
            first
                .map(|pos| tr.apps.iter().position(|a| a.pos == pos).expect("recursion 1 ran before"))
                .collect(),
        )
    }

    /// Records the applications of `positions` on token set `set`, whose saved activations
    /// must hold `rows` tokens (at least the set's size; see [`Workspace`]).
    #[allow(clippy::too_many_arguments)]
    fn push_apps(
        &mut self,
        b: &B,
        tr: &mut Trace<B>,
        positions: Range<usize>,
        set: usize,
        kv_src: Option<Vec<usize>>,
        rows: usize,
    ) -> Range<usize> {
        debug_assert!(rows >= tr.sets[set].len());
        let start = tr.apps.len();
        for (j, pos) in positions.enumerate() {
            tr.apps.push(App { pos, set, kv_src: kv_src.as_ref().map(|s| s[j]) });
        }
        let end = tr.apps.len();
        let ws = self.ws.as_mut().unwrap();
        for i in start..end {
            // Borrowers take the first recursion's keys/values (`kv_sources`).
            let kv_role = match tr.apps[i].kv_src {
                Some(_) => KvRole::Borrows,
                None if self.cfg.kv_mode() == KvMode::Share && self.map.step_positions(0).contains(&tr.apps[i].pos) => KvRole::Lends,
                None => KvRole::Owns,
            };
            if ensure_slot(&mut ws.acts, i, |a| a.cap >= rows && a.kv_role == kv_role, || LayerAct::new(b, &self.dims, rows, kv_role)) {
                self.ws_generation += 1;
            }
        }
        start..end
    }

    /// Run `positions` on every token of `set` (the full set), replacing `h`.
    fn plain_block(&mut self, b: &B, tr: &mut Trace<B>, positions: Range<usize>, set: usize, kv_src: Option<Vec<usize>>) {
        let rows = tr.sets[set].len();
        let apps = self.push_apps(b, tr, positions, set, kv_src, rows);
        let n = tr.sets[set].len() * self.dims.d;
        let ws = self.ws.as_mut().unwrap();
        b.copy(&mut ws.acts[apps.start].x, &ws.h, n);
        let Workspace { acts, scratch, h, .. } = ws;
        run_block(b, &self.dims, &self.params, &self.weights, tr, acts, &mut scratch.act, apps.clone(), h);
        tr.steps.push(StepTrace::Plain { apps });
        self.capture_h(b);
    }

    fn capture_h(&mut self, b: &B) {
        if self.capture {
            let ws = self.ws.as_ref().unwrap();
            self.captured.push(b.to_f32(&ws.h));
        }
    }

    /// Recursions each token took (1 for models without routers counts every recursion).
    fn depths_of(&self, tr: &Trace<B>) -> Vec<u8> {
        let n = tr.sets[0].len();
        let mut depth = vec![0u8; n];
        if self.router_cfg().is_none() {
            return vec![self.map.num_recursions as u8; n];
        }
        for step in &tr.steps {
            match step {
                StepTrace::Plain { .. } => {}
                StepTrace::Expert(et) => {
                    for &i in &tr.sets[et.sel].host().idx {
                        depth[i as usize] += 1;
                    }
                }
                StepTrace::Token(tt) => {
                    for (t, &k) in tt.depth.iter().enumerate() {
                        depth[t] = k as u8 + 1;
                    }
                }
            }
        }
        depth
    }

    /// Logits (`[vocab]`) of the last position of the last forward.
    pub fn last_hidden_logits(&mut self, b: &B) -> Vec<f32> {
        let (d, vocab) = (self.dims.d, self.cfg.vocab_size);
        let ws = self.ws.as_mut().expect("a forward ran");
        let n = self.token_depths.len();
        let idx = b.idx_from(&[(n - 1) as u32]);
        b.gather_rows(&mut ws.head_x, &ws.hn, &idx, 1, d);
        b.matmul_fwd(&mut ws.logits, &ws.head_x, self.params.value(self.weights.head()), 1, d, vocab);
        b.to_f32_prefix(&ws.logits, vocab)
    }

    /// Logits (`rows.len() × vocab`, row-major) of the given positions (flat `batch * seq_len`
    /// indices) of the last forward, e.g. for greedy-match checks in evaluation.
    pub fn logits_at(&mut self, b: &B, rows: &[usize]) -> Vec<f32> {
        let (d, vocab) = (self.dims.d, self.cfg.vocab_size);
        let ws = self.ws.as_mut().expect("a forward ran");
        let mut out = Vec::with_capacity(rows.len() * vocab);
        for chunk in rows.chunks(ws.head_rows) {
            let idx: Vec<u32> = chunk.iter().map(|&r| r as u32).collect();
            let idx = b.idx_from(&idx);
            b.gather_rows(&mut ws.head_x, &ws.hn, &idx, chunk.len(), d);
            b.matmul_fwd(&mut ws.logits, &ws.head_x, self.params.value(self.weights.head()), chunk.len(), d, vocab);
            out.extend(b.to_f32_prefix(&ws.logits, chunk.len() * vocab));
        }
        out
    }

    /// Free the workspace; the next forward makes it again (after a change of the backend's
    /// precision, whose activation buffers then get the new element type).
    pub fn free_workspace(&mut self) {
        self.ws = None;
    }

    /// Elements held by the workspace buffers (activations, scratch, head chunk) right now; 0
    /// before the first forward. Checked against [`crate::memory::estimate`].
    pub fn workspace_elems(&self, b: &B) -> usize {
        let Some(ws) = &self.ws else { return 0 };
        let mut t = 0;
        for a in &ws.acts {
            for x in [&a.x, &a.rstd1, &a.xn1, &a.q, &a.k, &a.v, &a.att, &a.att_act, &a.lse, &a.a, &a.rstd2, &a.xn2, &a.gate_up, &a.dk, &a.dv] {
                t += b.len(x);
            }
        }
        let s = &ws.scratch;
        for x in [&s.act, &s.dres, &s.dact, &s.dgate_up, &s.dxn, &s.datt, &s.dq, &s.dkvq, &s.dk, &s.dv] {
            t += b.len(x);
        }
        for sb in &ws.steps {
            for x in [&sb.x, &sb.g, &sb.gk, &sb.y, &sb.ye, &sb.targets, &sb.bce, &sb.dy, &sb.dyin, &sb.dgk, &sb.dg, &sb.dx] {
                t += b.len(x);
            }
        }
        for r in ws.routers.iter().chain(&ws.aux_routers) {
            for x in [&r.pre, &r.hid, &r.logits, &r.dlogits, &r.dpre, &r.dhid] {
                t += b.len(x);
            }
        }
        for x in [&ws.h, &ws.h1, &ws.tx, &ws.hn, &ws.rstd, &ws.dh, &ws.dhn, &ws.dtx, &ws.head_x, &ws.head_dx, &ws.logits, &ws.ce, &ws.ce_all] {
            t += b.len(x);
        }
        t + ws.dlogits.as_ref().map_or(0, |x| b.len(x))
    }

    /// Per-position cross-entropy of the last forward (0 where the target is ignored).
    pub fn token_losses(&self) -> &[f64] {
        &self.token_losses
    }

    /// Number of recursions each position of the last forward went through.
    pub fn token_depths(&self) -> &[u8] {
        &self.token_depths
    }

    /// Global token indices selected at each recursion of the last forward (expert-choice);
    /// active tokens per recursion (token-choice).
    pub fn selections(&self) -> Vec<Vec<u32>> {
        let Some(tr) = &self.trace else { return Vec::new() };
        let mut out = Vec::new();
        for step in &tr.steps {
            match step {
                StepTrace::Expert(et) => out.push(tr.sets[et.sel].host().idx.clone()),
                StepTrace::Token(tt) => {
                    for st in &tt.steps {
                        out.push(tr.sets[st.set].host().idx.clone());
                    }
                }
                StepTrace::Plain { .. } => {}
            }
        }
        out
    }

    /// Buffers of recursion step `r` for `cand` candidate and `sel` selected rows.
    fn step_buf(&mut self, b: &B, r: usize, cand: usize, sel: usize) {
        let d = self.dims.d;
        let ws = self.ws.as_mut().unwrap();
        if ensure_slot(&mut ws.steps, r, |s| s.cand >= cand && s.sel >= sel, || StepBuf::new(b, cand, sel, d)) {
            self.ws_generation += 1;
        }
    }

    /// Activations of router `i` (and of its aux router, if any) for `rows` rows; nothing for
    /// random routers, which have no weights.
    fn router_bufs(&mut self, b: &B, i: usize, rows: usize) {
        let ws = self.ws.as_mut().unwrap();
        for (acts, weights) in [(&mut ws.routers, &self.weights.routers), (&mut ws.aux_routers, &self.weights.aux_routers)] {
            if let Some(w) = weights.get(i) {
                if ensure_slot(acts, i, |a| a.cap >= rows, || RouterAct::new(b, w, rows)) {
                    self.ws_generation += 1;
                }
            }
        }
    }

    fn expert_forward(&mut self, b: &B, tr: &mut Trace<B>, routing: Routing, grad: bool, stats: &mut Stats) -> anyhow::Result<()> {
        let rc = self.router_cfg().unwrap().clone();
        let n_r = self.map.num_recursions;
        let (bsz, len, d) = (tr.segs.batch, tr.segs.seq_len, self.dims.d);
        let gate = gate_fn(rc.activation());
        let alpha = rc.alpha() as f32;
        let n = bsz * len;
        let mut cand = 0usize;
        for r in 0..n_r {
            let n_c = tr.sets[cand].len();
            // Top-k keeps exactly k tokens per sequence; threshold decisions depend on the router,
            // so those buffers hold every token (see `Workspace`).
            let warm = if grad { self.router_state.forward_calls as usize } else { usize::MAX };
            let k = expert_k(&rc, r, n_r, len, warm);
            let (cand_rows, sel_rows) = match routing {
                Routing::TopK => (n_c, bsz * k),
                Routing::Threshold => (n, n),
            };
            self.step_buf(b, r, cand_rows, sel_rows);
            self.router_bufs(b, r, cand_rows);
            let has_router = !rc.random;
            // Router scores of the candidates.
            {
                let ws = self.ws.as_mut().unwrap();
                let sb = &mut ws.steps[r];
                b.gather_rows(&mut sb.x, &ws.h, &tr.sets[cand].idx, n_c, d);
                if has_router {
                    let ra = &mut ws.routers[r];
                    router_forward(b, &self.params, &self.weights.routers[r], ra, &sb.x, n_c, d, rc.temperature as f32);
                    b.gate_fwd(&mut sb.g, &ra.logits, gate, alpha, n_c);
                } else {
                    // Random-router baseline: a reproducible stream per (seed, call, step).
                    let mut rng = ChaCha8Rng::seed_from_u64(
                        self.seed ^ (self.router_state.forward_calls.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ (r as u64) << 56,
                    );
                    let g: Vec<f32> = (0..n_c).map(|_| alpha * rng.gen::<f32>()).collect();
                    b.write_f32(&mut sb.g, &g);
                }
            }
            // Selection. Top-k with the batch rows as segments stays on the device (the subset is
            // composed there; `expert_stats` reads it after the forward, or after the step); with
            // document masks or threshold routing the host reads it and builds the subset, with
            // the router's logits for the statistics (read while the selection's read has drained
            // the queue: no wait of their own).
            let ws = self.ws.as_mut().unwrap();
            let read_logits = |ws: &Workspace<B>| if has_router { b.to_f64_prefix(&ws.routers[r].logits, n_c) } else { Vec::new() };
            let on_device = routing == Routing::TopK && tr.segs.num_segments == bsz;
            let (sel_set, on_host) = if on_device {
                let StepBuf { sel_local, g, .. } = &mut ws.steps[r];
                b.topk_segments(sel_local, g, &tr.sets[cand].cu, bsz, k);
                let queued = (tr.reads != Reads::AfterStep).then(|| QueuedReads {
                    local: b.idx_prefix_async(&ws.steps[r].sel_local, bsz * k),
                    logits: has_router.then(|| b.to_f64_prefix_async(&ws.routers[r].logits, n_c)),
                    aux_bce: None,
                });
                let aux_bce = has_router && rc.sampling == Sampling::AuxRouter;
                tr.pending.push(PendingSelection { r, cand, sel: tr.sets.len(), rows: bsz * k, logits: has_router, aux_bce, queued });
                let reuse = self.pooled_set(tr.sets.len());
                let sel_local = &self.ws.as_ref().unwrap().steps[r].sel_local;
                (TokenSet::compose_rows(b, &tr.segs, &tr.sets[cand], sel_local, k, reuse), None)
            } else {
                let (sel_local_host, logits_host): (Vec<u32>, Vec<f64>) = match routing {
                    Routing::TopK => {
                        let row_cu = b.idx_from(&tr.sets[cand].host().row_cu);
                        let StepBuf { sel_local, g, .. } = &mut ws.steps[r];
                        b.topk_segments(sel_local, g, &row_cu, bsz, k);
                        let mut local = b.idx_to_vec(sel_local);
                        local.truncate(bsz * k);
                        (local, read_logits(ws))
                    }
                    Routing::Threshold => {
                        let logits = read_logits(ws);
                        let scores: Vec<f64> = if has_router {
                            logits.clone()
                        } else {
                            // Random router: continue with probability 1/2 relative to its scale.
                            b.to_f32_prefix(&ws.steps[r].g, n_c).iter().map(|g| (g - alpha / 2.0) as f64).collect()
                        };
                        ((0..n_c as u32).filter(|&i| scores[i as usize] >= 0.0).collect(), logits)
                    }
                };
                b.idx_write(&mut ws.steps[r].sel_local, &sel_local_host);
                let set = tr.sets[cand].subset(b, &tr.segs, &sel_local_host);
                (set, Some((sel_local_host, logits_host)))
            };
            let m = sel_set.len();
            tr.sets.push(sel_set);
            let sel = tr.sets.len() - 1;
            let kv_src = self.kv_sources(tr, r);
            let apps = self.push_apps(b, tr, self.map.step_positions(r), sel, kv_src, sel_rows);

            let mut aux_bce_host = None;
            let ws = self.ws.as_mut().unwrap();
            let Workspace { acts, scratch, steps, aux_routers, h, .. } = ws;
            let sb = &mut steps[r];
            // The auxiliary router's objective on the candidates (device work, before the block).
            if has_router {
                b.fill(&mut sb.targets, n_c, 0.0);
                b.index_fill(&mut sb.targets, &sb.sel_local, m, 1.0);
                if rc.sampling == Sampling::AuxRouter {
                    let aw = &self.weights.aux_routers[r];
                    let ar = &mut aux_routers[r];
                    router_forward(b, &self.params, aw, ar, &sb.x, n_c, d, rc.temperature as f32);
                    b.bce_logits_fwd(&mut sb.bce, &ar.logits, &sb.targets, n_c);
                    match tr.pending.last_mut().filter(|p| p.r == r) {
                        Some(p) => {
                            if let Some(q) = p.queued.as_mut() {
                                q.aux_bce = Some(b.to_f64_prefix_async(&sb.bce, n_c));
                            }
                        }
                        None => aux_bce_host = Some(b.to_f64_prefix(&sb.bce, n_c)),
                    }
                }
            }
            // Run the block on the selected tokens and combine.
            b.gather_rows(&mut sb.gk, &sb.g, &sb.sel_local, m, 1);
            let sel_idx = &tr.sets[sel].idx;
            b.gather_rows(&mut acts[apps.start].x, h, sel_idx, m, d);
            run_block(b, &self.dims, &self.params, &self.weights, tr, acts, &mut scratch.act, apps.clone(), &mut sb.y);
            match rc.combine {
                Combine::Add => b.scatter_add_scaled_distinct(h, &sb.y, &sb.gk, &tr.sets[sel].idx, m, d),
                Combine::Replace => b.scatter_rows_distinct(h, &sb.y, &tr.sets[sel].idx, m, d),
            }
            stats.recursions.push(RecursionStats { selected_fraction: m as f64 / (bsz * len) as f64, ..Default::default() });
            // Statistics of a host selection now, on the host while the device runs the block.
            if let Some((sel_local_host, logits_host)) = on_host {
                self.router_stats(tr, r, sel, n_c, &sel_local_host, &logits_host, aux_bce_host.as_deref(), stats);
            }
            tr.steps.push(StepTrace::Expert(ExpertTrace { r, apps, cand, sel, buf: r, has_router }));
            cand = sel;
            self.capture_h(b);
        }
        Ok(())
    }

    /// Router statistics of expert-choice recursion `r` into `stats`, from its selection
    /// (`sel_local`, local indices into the candidates) and the router's logits (empty for a
    /// random router): BCE against the selection, sampling accuracy and z-loss, the aux router's
    /// BCE, and after the last recursion the dead-token ratio (from the host copy of set `sel`).
    #[allow(clippy::too_many_arguments)]
    fn router_stats(&self, tr: &Trace<B>, r: usize, sel: usize, n_c: usize, sel_local: &[u32], logits: &[f64], aux_bce: Option<&[f64]>, stats: &mut Stats) {
        let rc = self.router_cfg().unwrap();
        if !rc.random {
            let mut selected = vec![false; n_c];
            sel_local.iter().for_each(|&i| selected[i as usize] = true);
            // Sums of BCE, agreements and squared logits over fixed chunks in parallel (the host's
            // share of a recursion, while the device runs blocks), then the chunks in order: the
            // bits do not depend on the thread count.
            const CHUNK: usize = 4096;
            let parts: Vec<(f64, usize, f64)> = logits
                .par_chunks(CHUNK)
                .zip(selected.par_chunks(CHUNK))
                .map(|(lg, sel)| {
                    let bce = lg.iter().zip(sel).map(|(&x, &t)| bce_with_logits(x, if t { 1.0 } else { 0.0 })).sum::<f64>();
                    let agree = lg.iter().zip(sel).filter(|(l, t)| (**l >= 0.0) == **t).count();
                    (bce, agree, lg.iter().map(|x| x * x).sum::<f64>())
                })
                .collect();
            let bce = parts.iter().map(|p| p.0).sum::<f64>() / n_c as f64;
            let agree: usize = parts.iter().map(|p| p.1).sum();
            let z = parts.iter().map(|p| p.2).sum::<f64>() / n_c as f64;
            let rs = &mut stats.recursions[r];
            rs.sampling_accuracy = Some(agree as f64 / n_c as f64);
            rs.bce = Some(bce);
            stats.aux_bce += bce;
            if rc.sampling == Sampling::AuxLoss {
                stats.loss += rc.aux_coeff * bce;
            }
            stats.z_loss += z;
            stats.loss += rc.z_coeff() * z;
            if let Some(bce) = aux_bce {
                stats.aux_router_bce += bce.iter().sum::<f64>() / n_c as f64;
            }
        }
        if r == self.map.num_recursions - 1 {
            let len = tr.segs.seq_len;
            let mut seen = vec![false; len];
            for &i in &tr.sets[sel].host().idx {
                seen[i as usize % len] = true;
            }
            stats.dead_token_ratio = Some(seen.iter().filter(|s| !**s).count() as f64 / len as f64);
        }
    }

    /// The statistics of the expert-choice recursions whose selection stayed on the device: waits
    /// for their queued reads or reads now ([`Reads::AfterStep`]), fills in the selected sets' host
    /// copies (in recursion order: a set's candidates are the previous recursion's selection) and
    /// adds the router statistics.
    fn expert_stats(&self, b: &B, tr: &mut Trace<B>, stats: &mut Stats) {
        let ws = self.ws.as_ref().unwrap();
        for i in 0..tr.pending.len() {
            let p = &mut tr.pending[i];
            let (r, cand, sel) = (p.r, p.cand, p.sel);
            let n_c = tr.sets[cand].len();
            let (local, logits, aux_bce) = match p.queued.take() {
                Some(q) => (q.local.wait(), q.logits.map_or_else(Vec::new, Readback::wait), q.aux_bce.map(Readback::wait)),
                None => {
                    let mut local = b.idx_to_vec(&ws.steps[r].sel_local);
                    local.truncate(p.rows);
                    let logits = if p.logits { b.to_f64_prefix(&ws.routers[r].logits, n_c) } else { Vec::new() };
                    (local, logits, p.aux_bce.then(|| b.to_f64_prefix(&ws.steps[r].bce, n_c)))
                }
            };
            let (before, rest) = tr.sets.split_at_mut(sel);
            rest[0].fill_host(&tr.segs, before[cand].host(), &local);
            self.router_stats(tr, r, sel, n_c, &local, &logits, aux_bce.as_deref(), stats);
        }
    }

    fn token_forward(&mut self, b: &B, tr: &mut Trace<B>, grad: bool, stats: &mut Stats) -> anyhow::Result<()> {
        let rc = self.router_cfg().unwrap().clone();
        let n_r = self.map.num_recursions;
        let (n, d) = (tr.sets[0].len(), self.dims.d);
        let alpha = rc.alpha();
        let softmax = rc.activation() == RouterActivation::Softmax;
        // Which tokens reach each recursion depends on the router's assignment, and every token
        // may go all the way: the router and every step's buffers hold all n tokens.
        self.router_bufs(b, 0, n);
        // Router on h^1 (the stream entering recursion 1).
        let logits: Vec<f64> = {
            let ws = self.ws.as_mut().unwrap();
            b.copy(&mut ws.h1, &ws.h, n * d);
            b.copy(&mut ws.tx, &ws.h, n * d);
            if rc.random {
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ self.router_state.forward_calls.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                (0..n * n_r).map(|_| rng.gen::<f64>()).collect()
            } else {
                let ra = &mut ws.routers[0];
                router_forward(b, &self.params, &self.weights.routers[0], ra, &ws.h1, n, d, rc.temperature as f32);
                b.to_f64_prefix(&ra.logits, n * n_r)
            }
        };
        // Probabilities, depth assignment (bias only affects the argmax) and gate weights.
        let mut probs = vec![0.0f64; n * n_r];
        let mut depth = vec![0usize; n];
        let mut weight = vec![0f64; n];
        let mut counts = vec![0usize; n_r];
        let mut mean_norm = vec![0.0f64; n_r];
        for t in 0..n {
            let row = &logits[t * n_r..(t + 1) * n_r];
            let p = &mut probs[t * n_r..(t + 1) * n_r];
            if softmax {
                let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|x| (x - mx).exp()).sum();
                for j in 0..n_r {
                    p[j] = alpha * (row[j] - mx).exp() / z;
                }
            } else {
                for j in 0..n_r {
                    p[j] = alpha * sigmoid(row[j]);
                }
            }
            let mut best = 0;
            for j in 1..n_r {
                if p[j] + self.router_state.bias[j] > p[best] + self.router_state.bias[best] {
                    best = j;
                }
            }
            depth[t] = best;
            weight[t] = p[best];
            counts[best] += 1;
            let s: f64 = p.iter().sum();
            for j in 0..n_r {
                mean_norm[j] += p[j] / s / n as f64;
            }
        }
        // Losses on the router output.
        let frac: Vec<f64> = counts.iter().map(|&c| n_r as f64 * c as f64 / n as f64).collect();
        if !rc.random {
            let p_mean: Vec<f64> = (0..n_r).map(|j| (0..n).map(|t| probs[t * n_r + j]).sum::<f64>() / n as f64).collect();
            let bal: f64 = (0..n_r).map(|j| frac[j] * p_mean[j]).sum();
            stats.balance_loss = bal;
            if rc.balancing == Balancing::Loss {
                stats.loss += rc.balance_coeff * bal;
            }
            let z: f64 = (0..n)
                .map(|t| {
                    let row = &logits[t * n_r..(t + 1) * n_r];
                    let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                    lse * lse
                })
                .sum::<f64>()
                / n as f64;
            stats.z_loss = z;
            stats.loss += rc.z_coeff() * z;
        }
        let loads: Vec<f64> = counts.iter().map(|&c| c as f64 / n as f64).collect();
        let mean_load = 1.0 / n_r as f64;
        stats.max_vio = Some(loads.iter().map(|l| (l - mean_load) / mean_load).fold(f64::NEG_INFINITY, f64::max));
        stats.entropy = Some(-mean_norm.iter().filter(|&&p| p > 0.0).map(|p| p * p.ln()).sum::<f64>());
        if grad {
            for j in 0..n_r {
                self.router_state.load_sum[j] += loads[j];
            }
            self.router_state.load_batches += 1;
        }

        // Recursions: tokens with depth >= r are active; exits are gated, continuing tokens are not.
        let mut steps = Vec::new();
        let mut active: Vec<u32> = (0..n as u32).collect();
        let wbuf = b.from_f64(&weight);
        for r in 0..n_r {
            self.step_buf(b, r, n, n);
            let set = tr.sets[0].subset(b, &tr.segs, &active);
            tr.sets.push(set);
            let set_i = tr.sets.len() - 1;
            let kv_src = self.kv_sources(tr, r);
            let apps = self.push_apps(b, tr, self.map.step_positions(r), set_i, kv_src, n);
            let m = active.len();
            stats.recursions.push(RecursionStats { selected_fraction: m as f64 / n as f64, ..Default::default() });
            let (mut exit_l, mut exit_g, mut cont_l, mut cont_g) = (vec![], vec![], vec![], vec![]);
            for (l, &t) in active.iter().enumerate() {
                if depth[t as usize] == r {
                    exit_l.push(l as u32);
                    exit_g.push(t);
                } else {
                    cont_l.push(l as u32);
                    cont_g.push(t);
                }
            }
            let st = TokenStep {
                apps: apps.clone(),
                set: set_i,
                exit_local: b.idx_from(&exit_l),
                exit_global: b.idx_from(&exit_g),
                n_exit: exit_l.len(),
                cont_local: b.idx_from(&cont_l),
                cont_global: b.idx_from(&cont_g),
                n_cont: cont_l.len(),
                buf: r,
            };
            let ws = self.ws.as_mut().unwrap();
            let Workspace { acts, scratch, steps: sbufs, h, tx, .. } = ws;
            let sb = &mut sbufs[r];
            b.gather_rows(&mut acts[apps.start].x, tx, &tr.sets[set_i].idx, m, d);
            run_block(b, &self.dims, &self.params, &self.weights, tr, acts, &mut scratch.act, apps.clone(), &mut sb.y);
            // exits: out[t] = h1[t] + w_t · y[t]   (h holds h1 for every token until it exits)
            b.gather_rows(&mut sb.ye, &sb.y, &st.exit_local, st.n_exit, d);
            b.gather_rows(&mut sb.gk, &wbuf, &st.exit_global, st.n_exit, 1);
            b.scatter_add_scaled_distinct(h, &sb.ye, &sb.gk, &st.exit_global, st.n_exit, d);
            // continuing tokens: x[t] = y[t]
            b.gather_rows(&mut sb.x, &sb.y, &st.cont_local, st.n_cont, d);
            b.scatter_rows_distinct(tx, &sb.x, &st.cont_global, st.n_cont, d);
            steps.push(st);
            active = cont_g;
        }
        tr.steps.push(StepTrace::Token(TokenTrace { steps, depth, probs, logits }));
        self.capture_h(b);
        Ok(())
    }

    /// Final norm, LM head and cross-entropy (per-token losses into `ce_all`), in row chunks so
    /// the full logits never exist at once. With `grad`, also `dhn` and the head's weight gradient.
    fn head_forward(&mut self, b: &B, grad: bool, loss_scale: f32) {
        let valid = self.staged.as_ref().expect("a staged batch").valid;
        let n = self.ws.as_ref().unwrap().n;
        let (d, vocab) = (self.dims.d, self.cfg.vocab_size);
        let head = self.weights.head();
        let ws = self.ws.as_mut().unwrap();
        b.rmsnorm_fwd(&mut ws.hn, &mut ws.rstd, &ws.h, self.params.value(self.weights.final_norm), n, d, self.dims.eps);
        if grad {
            b.fill(&mut ws.dhn, n * d, 0.0);
        }
        let scale = if valid > 0 { loss_scale / valid as f32 } else { 0.0 };
        for (c, start) in (0..n).step_by(ws.head_rows).enumerate() {
            let rows = ws.head_rows.min(n - start);
            let (idx, targets) = (&ws.head_idx[c], &ws.head_targets[c]);
            b.gather_rows(&mut ws.head_x, &ws.hn, idx, rows, d);
            b.matmul_fwd(&mut ws.logits, &ws.head_x, self.params.value(head), rows, d, vocab);
            // Training: losses and their gradient in one op (one pair of passes over the logits;
            // dlogits is an activation buffer, bf16 in CUDA's bf16 mode, read as is by matmul_bwd).
            let ce = if rows == n { &mut ws.ce_all } else { &mut ws.ce };
            if grad {
                if ws.dlogits.is_none() {
                    ws.dlogits = Some(b.zeros_act(ws.head_rows * vocab));
                    self.ws_generation += 1;
                }
                let dlogits = ws.dlogits.as_mut().unwrap();
                b.cross_entropy_fwd_bwd(ce, dlogits, &ws.logits, targets, scale, rows, vocab);
            } else {
                b.cross_entropy_fwd(ce, &ws.logits, targets, rows, vocab);
            }
            if rows != n {
                // Collect the chunk's losses on the device: one host read per forward, not per chunk.
                b.scatter_rows_distinct(&mut ws.ce_all, &ws.ce, idx, rows, 1);
            }
            if grad {
                let dlogits = ws.dlogits.as_ref().unwrap();
                b.fill(&mut ws.head_dx, rows * d, 0.0);
                let ParamStore { values, grads, .. } = &mut self.params;
                b.matmul_bwd(Some(&mut ws.head_dx), &mut grads[head.0], dlogits, &ws.head_x, &values[head.0], rows, d, vocab);
                b.scatter_add_rows_distinct(&mut ws.dhn, &ws.head_dx, idx, rows, d);
            }
        }
    }

    /// Backward of the last `forward(.., grad = true, ..)`: accumulates into `params.grads`.
    pub fn backward(&mut self, b: &B) -> anyhow::Result<()> {
        let mut tr = match self.trace.take() {
            Some(tr) if !tr.backward_done => tr,
            done => {
                self.trace = done;
                anyhow::bail!("backward without a forward (the last forward's backward already ran)");
            }
        };
        let n = tr.sets[0].len();
        let d = self.dims.d;
        let scale = tr.loss_scale;
        {
            let ws = self.ws.as_mut().unwrap();
            // Keys/values that later applications borrow collect their gradients before the
            // owner's backward; the others are written by the owner's attention backward alone.
            for a in ws.acts.iter_mut().take(tr.apps.len()).enumerate().filter(|(i, a)| a.kv_role == KvRole::Lends && tr.kv_borrowed(*i)).map(|(_, a)| a) {
                let kvd = self.dims.kvd() * a.cap;
                b.fill(&mut a.dk, kvd, 0.0);
                b.fill(&mut a.dv, kvd, 0.0);
            }
            b.fill(&mut ws.dh, n * d, 0.0);
            let ParamStore { values, grads, .. } = &mut self.params;
            let fw = self.weights.final_norm;
            b.rmsnorm_bwd(&mut ws.dh, &mut grads[fw.0], &ws.dhn, &ws.h, &values[fw.0], &ws.rstd, n, d);
        }
        for step in tr.steps.iter().rev() {
            match step {
                StepTrace::Plain { apps } => {
                    // The block replaced h: its input gradient replaces dh.
                    let Workspace { acts, scratch, dh, .. } = self.ws.as_mut().unwrap();
                    run_block_backward(b, &self.dims, &mut self.params, &self.weights, &tr, acts, scratch, apps.clone(), dh);
                }
                StepTrace::Expert(et) => self.expert_backward(b, &tr, et, scale)?,
                StepTrace::Token(tt) => self.token_backward(b, &tr, tt, scale)?,
            }
        }
        let ws = self.ws.as_mut().unwrap();
        let embed = self.weights.embed;
        b.embedding_bwd(&mut self.params.grads[embed.0], &ws.dh, &ws.ids, n, d);
        tr.backward_done = true;
        self.trace = Some(tr);
        Ok(())
    }

    fn expert_backward(&mut self, b: &B, tr: &Trace<B>, et: &ExpertTrace, scale: f32) -> anyhow::Result<()> {
        let rc = self.router_cfg().unwrap().clone();
        let d = self.dims.d;
        let n_c = tr.sets[et.cand].len();
        let m = tr.sets[et.sel].len();
        let ws = self.ws.as_mut().unwrap();
        let Workspace { acts, scratch, steps, routers, aux_routers, dh, .. } = ws;
        let sb = &mut steps[et.buf];
        let sel_idx = &tr.sets[et.sel].idx;
        b.fill(&mut sb.dy, m * d, 0.0);
        b.fill(&mut sb.dgk, m, 0.0);
        match rc.combine {
            Combine::Add => b.scatter_add_scaled_bwd(&mut sb.dy, &mut sb.dgk, dh, &sb.y, &sb.gk, sel_idx, m, d),
            Combine::Replace => b.scatter_rows_bwd(&mut sb.dy, dh, sel_idx, m, d),
        }
        run_block_backward(b, &self.dims, &mut self.params, &self.weights, tr, acts, scratch, et.apps.clone(), &mut sb.dy);
        b.scatter_add_rows_distinct(dh, &sb.dy, sel_idx, m, d);
        if !et.has_router {
            return Ok(());
        }
        let ra = &mut routers[et.r];
        b.fill(&mut ra.dlogits, n_c, 0.0);
        if rc.combine == Combine::Add {
            b.fill(&mut sb.dg, n_c, 0.0);
            b.scatter_add_rows_distinct(&mut sb.dg, &sb.dgk, &sb.sel_local, m, 1);
            b.gate_bwd(&mut ra.dlogits, &sb.dg, &ra.logits, gate_fn(rc.activation()), rc.alpha() as f32, n_c);
        }
        if rc.sampling == Sampling::AuxLoss && rc.aux_coeff > 0.0 {
            b.bce_logits_bwd(&mut ra.dlogits, &ra.logits, &sb.targets, (rc.aux_coeff as f32) * scale / n_c as f32, n_c);
        }
        if rc.z_coeff() > 0.0 {
            b.axpy(&mut ra.dlogits, &ra.logits, 2.0 * rc.z_coeff() as f32 * scale / n_c as f32, n_c);
        }
        b.fill(&mut sb.dx, n_c * d, 0.0);
        router_backward(b, &mut self.params, &self.weights.routers[et.r], ra, &sb.x, n_c, d, rc.temperature as f32, Some(&mut sb.dx));
        b.scatter_add_rows_distinct(dh, &sb.dx, &tr.sets[et.cand].idx, n_c, d);
        if rc.sampling == Sampling::AuxRouter {
            let ar = &mut aux_routers[et.r];
            b.fill(&mut ar.dlogits, n_c, 0.0);
            b.bce_logits_bwd(&mut ar.dlogits, &ar.logits, &sb.targets, scale / n_c as f32, n_c);
            router_backward(b, &mut self.params, &self.weights.aux_routers[et.r], ar, &sb.x, n_c, d, rc.temperature as f32, None);
        }
        Ok(())
    }

    fn token_backward(&mut self, b: &B, tr: &Trace<B>, tt: &TokenTrace<B>, scale: f32) -> anyhow::Result<()> {
        let rc = self.router_cfg().unwrap().clone();
        let n_r = self.map.num_recursions;
        let d = self.dims.d;
        let n = tr.sets[0].len();
        let mut dweight = vec![0.0f64; n];
        {
            let ws = self.ws.as_mut().unwrap();
            let Workspace { acts, scratch, steps, dh, dtx, .. } = ws;
            b.fill(dtx, n * d, 0.0);
            for st in tt.steps.iter().rev() {
                let sb = &mut steps[st.buf];
                let m = tr.sets[st.set].len();
                b.fill(&mut sb.dy, m * d, 0.0);
                // exits
                b.fill(&mut sb.dyin, st.n_exit * d, 0.0);
                b.fill(&mut sb.dgk, st.n_exit, 0.0);
                b.gather_rows(&mut sb.ye, &sb.y, &st.exit_local, st.n_exit, d);
                b.scatter_add_scaled_bwd(&mut sb.dyin, &mut sb.dgk, dh, &sb.ye, &sb.gk, &st.exit_global, st.n_exit, d);
                b.scatter_add_rows_distinct(&mut sb.dy, &sb.dyin, &st.exit_local, st.n_exit, d);
                let dw = b.to_f64_prefix(&sb.dgk, st.n_exit);
                let exits: Vec<u32> = b.idx_to_vec(&st.exit_global);
                for (i, &t) in exits.iter().enumerate() {
                    dweight[t as usize] += dw[i];
                }
                // continuing tokens
                b.fill(&mut sb.dyin, st.n_cont * d, 0.0);
                b.scatter_rows_bwd(&mut sb.dyin, dtx, &st.cont_global, st.n_cont, d);
                b.scatter_add_rows_distinct(&mut sb.dy, &sb.dyin, &st.cont_local, st.n_cont, d);
                // through the block into x
                run_block_backward(b, &self.dims, &mut self.params, &self.weights, tr, acts, scratch, st.apps.clone(), &mut sb.dy);
                b.scatter_add_rows_distinct(dtx, &sb.dy, &tr.sets[st.set].idx, m, d);
            }
            b.axpy(dh, dtx, 1.0, n * d);
        }
        if rc.random {
            return Ok(());
        }
        // Router: gradient w.r.t. probabilities, then logits (host; n × N_r values).
        let alpha = rc.alpha();
        let mut dp = vec![0.0f64; n * n_r];
        for t in 0..n {
            dp[t * n_r + tt.depth[t]] += dweight[t];
        }
        if rc.balancing == Balancing::Loss && rc.balance_coeff > 0.0 {
            let mut counts = vec![0usize; n_r];
            for &k in &tt.depth {
                counts[k] += 1;
            }
            for t in 0..n {
                for j in 0..n_r {
                    let f = n_r as f64 * counts[j] as f64 / n as f64;
                    dp[t * n_r + j] += rc.balance_coeff * scale as f64 * f / n as f64;
                }
            }
        }
        let softmax = rc.activation() == RouterActivation::Softmax;
        let zc = rc.z_coeff();
        let mut dlogits = vec![0f64; n * n_r];
        for t in 0..n {
            let p = &tt.probs[t * n_r..(t + 1) * n_r];
            let g = &dp[t * n_r..(t + 1) * n_r];
            let row = &tt.logits[t * n_r..(t + 1) * n_r];
            let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|x| (x - mx).exp()).sum();
            let lse = mx + z.ln();
            for j in 0..n_r {
                let mut v = if softmax {
                    // p = α s; dL/dlogit_j = Σ_i g_i α s_i (δ_ij - s_j) = p_j (g_j - Σ_i g_i s_i)
                    let s_dot: f64 = (0..n_r).map(|i| g[i] * p[i] / alpha).sum();
                    p[j] * (g[j] - s_dot)
                } else {
                    let s = p[j] / alpha;
                    g[j] * alpha * s * (1.0 - s)
                };
                if zc > 0.0 {
                    v += zc * scale as f64 * 2.0 * lse * (row[j] - mx).exp() / z / n as f64;
                }
                dlogits[t * n_r + j] = v;
            }
        }
        let ws = self.ws.as_mut().unwrap();
        let Workspace { routers, h1, dh, steps, .. } = ws;
        let ra = &mut routers[0];
        b.write_f64(&mut ra.dlogits, &dlogits);
        let dx = &mut steps[0].dx;
        b.fill(dx, n * d, 0.0);
        router_backward(b, &mut self.params, &self.weights.routers[0], ra, h1, n, d, rc.temperature as f32, Some(dx));
        b.axpy(dh, dx, 1.0, n * d);
        Ok(())
    }

    /// Called after each optimizer step: the token-choice loss-free bias update
    /// `b_i += u · sign(mean_load - load_i)` with loads averaged over the accumulated batches.
    pub fn after_optimizer_step(&mut self) {
        let st = &mut self.router_state;
        if let Some(rc) = self.cfg.router.as_ref() {
            if rc.kind == RouterKind::Token && rc.balancing == Balancing::LossFree && st.load_batches > 0 {
                let loads: Vec<f64> = st.load_sum.iter().map(|l| l / st.load_batches as f64).collect();
                let mean = loads.iter().sum::<f64>() / loads.len() as f64;
                for (b, l) in st.bias.iter_mut().zip(&loads) {
                    let s = mean - l;
                    *b += rc.bias_update_rate * if s > 0.0 { 1.0 } else if s < 0.0 { -1.0 } else { 0.0 };
                }
            }
        }
        st.load_sum.iter_mut().for_each(|l| *l = 0.0);
        st.load_batches = 0;
    }
}

/// Tokens per sequence an expert-choice top-k step `r` keeps at training forward call `call`
/// (`usize::MAX` at evaluation: no capacity warm-up). [`crate::memory::estimate`] sizes with it.
pub(crate) fn expert_k(rc: &RouterConfig, r: usize, n_r: usize, seq_len: usize, call: usize) -> usize {
    capacity_tokens(warmed_capacity(rc.capacity(r, n_r), call, rc.capacity_warmup), seq_len)
}

/// Whether the recursion blocks are contiguous runs of layer positions (cycle and middle-cycle
/// sharing): only then does the forward run recursion steps (routers, KV sharing); otherwise
/// every position is a plain layer.
pub(crate) fn blocks_contiguous(map: &SharingMap) -> bool {
    map.strategy.is_some_and(|s| matches!(s, mor_config::Sharing::Cycle | mor_config::Sharing::MiddleCycle))
}

/// Makes `slots[i]` satisfy `fits`: creates the next slot, or replaces one that is too small
/// (freeing its buffers before allocating the new ones). Slots are created in index order.
/// Returns whether it allocated.
fn ensure_slot<T>(slots: &mut Vec<T>, i: usize, fits: impl Fn(&T) -> bool, new: impl FnOnce() -> T) -> bool {
    if i == slots.len() {
        slots.push(new());
    } else if !fits(&slots[i]) {
        drop(slots.remove(i));
        slots.insert(i, new());
    } else {
        return false;
    }
    true
}

/// Forward through the consecutive applications `apps`; the first one's input is already in
/// `acts[apps.start].x`; the last one writes `out`. `mlp_act`: [`LayerScratch::act`].
#[allow(clippy::too_many_arguments)]
fn run_block<B: Backend>(
    b: &B,
    dims: &Dims,
    params: &ParamStore<B>,
    weights: &Weights,
    tr: &Trace<B>,
    acts: &mut [LayerAct<B>],
    mlp_act: &mut B::Buf,
    apps: Range<usize>,
    out: &mut B::Buf,
) {
    for i in apps.clone() {
        let app = &tr.apps[i];
        let (before, rest) = acts.split_at_mut(i);
        let (cur, after) = rest.split_first_mut().unwrap();
        let target = if i + 1 < apps.end { &mut after[0].x } else { &mut *out };
        let shared = app.kv_src.map(|s| SharedKv { src: &mut before[s], set: &tr.sets[tr.apps[s].set] });
        layer_forward(b, dims, params, &weights.layers[app.pos], cur, &tr.sets[app.set], shared, mlp_act, target);
    }
}

/// Backward through `apps`: `g` holds the gradient of the block output on entry and that of
/// the block input on return (in place down the layers, no copy per layer).
#[allow(clippy::too_many_arguments)]
fn run_block_backward<B: Backend>(
    b: &B,
    dims: &Dims,
    params: &mut ParamStore<B>,
    weights: &Weights,
    tr: &Trace<B>,
    acts: &mut [LayerAct<B>],
    scratch: &mut LayerScratch<B>,
    apps: Range<usize>,
    g: &mut B::Buf,
) {
    let top = apps.end - 1;
    for i in apps.rev() {
        let app = &tr.apps[i];
        let (before, rest) = acts.split_at_mut(i);
        let shared = app.kv_src.map(|s| SharedKv { src: &mut before[s], set: &tr.sets[tr.apps[s].set] });
        let kv = match shared {
            Some(kv) => KvGrad::Into(kv),
            None if tr.kv_borrowed(i) => KvGrad::Add,
            None => KvGrad::Set,
        };
        layer_backward(b, dims, params, &weights.layers[app.pos], &mut rest[0], &tr.sets[app.set], kv, scratch, g, i != top);
    }
}
