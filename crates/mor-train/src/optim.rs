//! AdamW over one [`ParamGroup`] of a [`ParamStore`], with global gradient-norm clipping
//! (MOR_SPEC 7.2: β1 0.9, β2 0.95, ε 1e-8, weight decay 0.1, clip 1.0).
//!
//! One optimizer per group: the main model uses `ParamGroup::Main`; the expert-choice aux router
//! (MOR_SPEC 3.6) has its own optimizer over `ParamGroup::AuxRouter` whose learning rate is the
//! scheduled LR times `lr_mult` (`model.router.aux_router_lr_mult`).
//!
//! Typical use, once per optimizer step (after the gradients of all micro-batches have been
//! accumulated into `params.grads`):
//! ```
//! use mor_engine::{Cpu, ParamGroup, ParamInfo, ParamStore};
//! use mor_train::{AdamW, AdamWConfig, LrSchedule};
//! let backend = Cpu::<f32>::new();
//! let mut params = ParamStore::new();
//! let info = ParamInfo { name: "w".into(), shape: vec![2], decay: true, group: ParamGroup::Main };
//! params.add(&backend, info, &[1.0, 2.0]);
//! let sched = LrSchedule::wsd(3e-3, 100, 5, 0.2); // or LrSchedule::from_config(&cfg.train)
//! let mut opt = AdamW::new(&backend, &params, ParamGroup::Main, AdamWConfig::default());
//! // ... forward / backward accumulate into params.grads ...
//! let stats = opt.step(&backend, &mut params, sched.lr(opt.steps_taken() as usize));
//! assert_eq!(stats.lr, 0.0); // WSD: the first update has LR 0
//! params.zero_grads(&backend);
//! ```
//! The update itself is [`Backend::adamw_many`] over the group's tensors (one launch on the GPU;
//! PyTorch semantics per tensor: decoupled decay `p -= lr·wd·p`, then the bias-corrected Adam
//! step with the 1-based step count), the clipping coefficient applied to the gradients inside
//! it: after a step the gradient buffers still hold the unclipped gradients.

use anyhow::{bail, Result};
use mor_config::{ModelConfig, RouterKind, Sampling, TrainConfig};
use mor_engine::backend::{opt_scalars, AdamStepScalars};
use mor_engine::{AdamWItem, Backend, ParamGroup, ParamId, ParamStore};
use std::collections::HashMap;

/// A host copy of one named tensor (row-major f32).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Hyper-parameters of one [`AdamW`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied only to tensors whose [`mor_engine::ParamInfo::decay`] is true.
    pub weight_decay: f64,
    /// Clip the group's global gradient L2 norm to this value; `0` disables clipping.
    pub grad_clip: f64,
    /// The learning rate used is `lr * lr_mult` (1 for the main group).
    pub lr_mult: f64,
    /// If the gradient norm is NaN/inf, leave parameters, moments and the step count untouched
    /// and report `skipped` (default true). PyTorch would instead propagate NaN into the weights.
    pub skip_nonfinite: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            lr_mult: 1.0,
            skip_nonfinite: true,
        }
    }
}

impl AdamWConfig {
    /// `beta1`, `beta2`, `adam_eps`, `weight_decay`, `grad_clip` from the config; `lr_mult` 1.
    pub fn from_train(cfg: &TrainConfig) -> Self {
        AdamWConfig {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
            grad_clip: cfg.grad_clip,
            lr_mult: 1.0,
            skip_nonfinite: true,
        }
    }

    /// The same settings with another LR multiplier (the aux-router optimizer).
    pub fn with_lr_mult(mut self, lr_mult: f64) -> Self {
        self.lr_mult = lr_mult;
        self
    }
}

/// What one [`AdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the group's gradients **before** clipping.
    pub grad_norm: f64,
    /// Whether clipping scaled the gradients down (in the update: the gradient buffers are left
    /// unclipped).
    pub clipped: bool,
    /// The learning rate actually applied (`lr * lr_mult`).
    pub lr: f64,
    /// True when the step was skipped because the gradient norm was not finite.
    pub skipped: bool,
}

/// AdamW state for the tensors of one [`ParamGroup`]; first/second moment buffers are allocated
/// once, at construction, on the backend.
pub struct AdamW<B: Backend> {
    group: ParamGroup,
    cfg: AdamWConfig,
    ids: Vec<ParamId>,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    step: u64,
    store_len: usize,
    /// The step's scalars on the device for [`AdamW::update`] ([`opt_scalars`]), and the LR
    /// [`AdamW::stage`] put there.
    scalars: B::Buf,
    staged_lr: Option<f64>,
}

/// Name of the optimizer state tensors in checkpoints: `<param>.exp_avg` (m), `<param>.exp_avg_sq` (v).
pub fn exp_avg_name(param: &str) -> String {
    format!("{param}.exp_avg")
}
pub fn exp_avg_sq_name(param: &str) -> String {
    format!("{param}.exp_avg_sq")
}

/// The optimizers a model trains with: AdamW over the main parameters, and over the auxiliary
/// routers when the model has them (expert-choice with `sampling = aux_router`), at
/// `aux_router_lr_mult` times the LR.
pub fn model_optimizers<B: Backend>(b: &B, params: &ParamStore<B>, model: &ModelConfig, cfg: AdamWConfig) -> (AdamW<B>, Option<AdamW<B>>) {
    let main = AdamW::new(b, params, ParamGroup::Main, cfg);
    let aux_router = model.router.as_ref().filter(|r| r.kind == RouterKind::Expert && r.sampling == Sampling::AuxRouter);
    let aux = aux_router.map(|r| AdamW::new(b, params, ParamGroup::AuxRouter, cfg.with_lr_mult(r.aux_router_lr_mult)));
    (main, aux)
}

impl<B: Backend> AdamW<B> {
    /// An optimizer over every tensor of `params` in `group` (which may be empty: then
    /// [`AdamW::step`] only advances the step count). Tensors added to the store later are not
    /// covered; create the optimizer after the model.
    pub fn new(backend: &B, params: &ParamStore<B>, group: ParamGroup, cfg: AdamWConfig) -> Self {
        let ids: Vec<ParamId> = params.ids().filter(|id| params.info[id.0].group == group).collect();
        let m = ids.iter().map(|id| backend.zeros(params.info[id.0].numel())).collect();
        let v = ids.iter().map(|id| backend.zeros(params.info[id.0].numel())).collect();
        AdamW { group, cfg, ids, m, v, step: 0, store_len: params.len(), scalars: backend.zeros(opt_scalars::LEN), staged_lr: None }
    }

    pub fn group(&self) -> ParamGroup {
        self.group
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The tensors this optimizer updates.
    pub fn param_ids(&self) -> &[ParamId] {
        &self.ids
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of updates applied so far (= the 0-based index of the next update, the argument
    /// for [`crate::schedule::LrSchedule::lr`]).
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    fn check_store(&self, params: &ParamStore<B>) {
        assert_eq!(
            params.len(),
            self.store_len,
            "ParamStore changed size after the {:?} optimizer was created",
            self.group
        );
    }

    /// Global L2 norm of this group's gradients, `sqrt(Σ sum_squares(grad))` (f64).
    pub fn grad_norm(&self, backend: &B, params: &ParamStore<B>) -> f64 {
        self.check_store(params);
        let xs: Vec<(&B::Buf, usize)> = self.ids.iter().map(|id| (&params.grads[id.0], params.info[id.0].numel())).collect();
        backend.sum_squares_many(&xs).into_iter().sum::<f64>().sqrt()
    }

    /// The group's gradient norm and PyTorch `clip_grad_norm_`'s coefficient `max/(norm + 1e-6)`
    /// when clipping applies (`grad_clip > 0`, a finite norm, coefficient < 1).
    pub fn clip_coef(&self, backend: &B, params: &ParamStore<B>) -> (f64, Option<f64>) {
        let norm = self.grad_norm(backend, params);
        if self.cfg.grad_clip > 0.0 && norm.is_finite() {
            let coef = self.cfg.grad_clip / (norm + 1e-6);
            if coef < 1.0 {
                return (norm, Some(coef));
            }
        }
        (norm, None)
    }

    /// PyTorch `clip_grad_norm_`: scale the group's gradients in place by [`AdamW::clip_coef`]'s
    /// coefficient when clipping applies. Returns `(pre-clip norm, clipped)`. A non-finite norm is
    /// returned without touching the gradients. [`AdamW::step`] does not call this: it applies
    /// the coefficient inside the update.
    pub fn clip_grad_norm(&self, backend: &B, params: &mut ParamStore<B>) -> (f64, bool) {
        let (norm, coef) = self.clip_coef(backend, params);
        if let Some(coef) = coef {
            for id in &self.ids {
                let n = params.info[id.0].numel();
                backend.scale(&mut params.grads[id.0], coef as f32, n);
            }
        }
        (norm, coef.is_some())
    }

    /// One optimizer step with scheduled learning rate `lr` (the multiplier is applied here):
    /// AdamW-update every tensor of the group with its gradient clipped by [`AdamW::clip_coef`],
    /// weight decay only where `decay` is set, all in one [`Backend::adamw_many`]. The same
    /// update as [`AdamW::clip_grad_norm`] then per-tensor [`Backend::adamw`], bit for bit, but the
    /// gradients are neither clipped in place nor zeroed. See [`AdamWConfig::skip_nonfinite`].
    pub fn step(&mut self, backend: &B, params: &mut ParamStore<B>, lr: f64) -> StepStats {
        let (grad_norm, coef) = self.clip_coef(backend, params);
        let clipped = coef.is_some();
        let lr = lr * self.cfg.lr_mult;
        if self.cfg.skip_nonfinite && !grad_norm.is_finite() {
            return StepStats { grad_norm, clipped, lr, skipped: true };
        }
        self.step += 1;
        let c = &self.cfg;
        let (beta1, beta2, eps, step) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32, self.step);
        let grad_scale = coef.map_or(1.0, |k| k as f32);
        let mut items = Self::items_of(&self.ids, &mut self.m, &mut self.v, c.weight_decay, params);
        backend.adamw_many(&mut items, lr as f32, beta1, beta2, eps, step, grad_scale);
        StepStats { grad_norm, clipped, lr, skipped: false }
    }

    /// [`AdamW::step`] in three parts, the middle one without host reads or per-step arguments
    /// (recordable in a CUDA graph, [`crate::OptimizerRunner`]): `stage` puts the LR and the
    /// step's scalars into the device scalar block, [`AdamW::update`] clips and updates from it,
    /// [`AdamW::finish`] reads the norm back and counts the step. The same update bit for bit.
    pub fn stage(&mut self, backend: &B, lr: f64) {
        let lr = lr * self.cfg.lr_mult;
        let c = &self.cfg;
        let step = self.step + 1;
        let s = AdamStepScalars::new(lr as f32, c.beta1 as f32, c.beta2 as f32, step);
        let mut v = [0.0f64; opt_scalars::LEN];
        v[opt_scalars::LR] = lr as f32 as f64;
        v[opt_scalars::STEP] = step as f64;
        v[opt_scalars::STEP_SIZE] = s.step_size;
        v[opt_scalars::BC2_SQRT] = s.bc2_sqrt;
        v[opt_scalars::OB1] = s.ob1;
        v[opt_scalars::OB2] = s.ob2;
        backend.write_f64(&mut self.scalars, &v);
        self.staged_lr = Some(lr);
    }

    /// The staged step's device work: gradient norm and clip scale on the device
    /// ([`Backend::clip_scalars`]), then the update from the scalar block
    /// ([`Backend::adamw_many_dev`]).
    pub fn update(&mut self, backend: &B, params: &mut ParamStore<B>) {
        self.check_store(params);
        let xs: Vec<(&B::Buf, usize)> = self.ids.iter().map(|id| (&params.grads[id.0], params.info[id.0].numel())).collect();
        backend.clip_scalars(&xs, self.cfg.grad_clip, &mut self.scalars);
        let c = &self.cfg;
        let (beta1, beta2, eps, skip) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32, c.skip_nonfinite);
        let scalars = &self.scalars;
        let mut items = Self::items_of(&self.ids, &mut self.m, &mut self.v, c.weight_decay, params);
        backend.adamw_many_dev(&mut items, beta1, beta2, eps, skip, scalars);
    }

    /// The result of the staged step (its norm read from the device); counts it unless skipped.
    pub fn finish(&mut self, backend: &B) -> StepStats {
        let lr = self.staged_lr.take().expect("AdamW::finish without AdamW::stage");
        let v = backend.to_f64_prefix(&self.scalars, opt_scalars::LEN);
        let finite = v[opt_scalars::FINITE] != 0.0;
        let grad_norm = v[opt_scalars::NORM_HI] + v[opt_scalars::NORM_LO];
        let skipped = self.cfg.skip_nonfinite && !finite;
        if !skipped {
            self.step += 1;
        }
        StepStats { grad_norm, clipped: v[opt_scalars::CLIPPED] != 0.0, lr, skipped }
    }

    /// The group's tensors (`ids`) with their moments and weight decay, for one AdamW launch.
    fn items_of<'a>(ids: &[ParamId], m: &'a mut [B::Buf], v: &'a mut [B::Buf], weight_decay: f64, params: &'a mut ParamStore<B>) -> Vec<AdamWItem<'a, B>> {
        let ParamStore { info, values, grads } = params;
        // `ids` is ascending: walk the store once, taking the group's tensors with their moments.
        let mut ids = ids.iter().map(|id| id.0).peekable();
        let mut moments = m.iter_mut().zip(v.iter_mut());
        let mut items: Vec<AdamWItem<'_, B>> = Vec::with_capacity(ids.len());
        for (i, ((param, grad), meta)) in values.iter_mut().zip(grads.iter()).zip(info.iter()).enumerate() {
            if ids.next_if_eq(&i).is_some() {
                let (m, v) = moments.next().expect("moments of every tensor of the group");
                let weight_decay = if meta.decay { weight_decay as f32 } else { 0.0 };
                items.push(AdamWItem { param, grad, m, v, n: meta.numel(), weight_decay });
            }
        }
        items
    }

    /// Zero the gradients of this group only ([`Backend::fill_many`]).
    pub fn zero_grads(&self, backend: &B, params: &mut ParamStore<B>) {
        let ParamStore { info, grads, .. } = params;
        let mut ids = self.ids.iter().map(|id| id.0).peekable();
        let mut bufs: Vec<(&mut B::Buf, usize)> = grads
            .iter_mut()
            .zip(info.iter())
            .enumerate()
            .filter_map(|(i, (g, meta))| ids.next_if_eq(&i).map(|_| (g, meta.numel())))
            .collect();
        backend.fill_many(&mut bufs, 0.0);
    }

    /// Set the step count (restoring from a checkpoint).
    pub fn set_steps_taken(&mut self, step: u64) {
        self.step = step;
    }

    /// The moment buffers `(m, v)` of the `k`-th tensor of [`AdamW::param_ids`].
    pub(crate) fn moments(&self, k: usize) -> (&B::Buf, &B::Buf) {
        (&self.m[k], &self.v[k])
    }

    /// Overwrite the moments of the `k`-th tensor (lengths already validated by the caller).
    pub(crate) fn write_moments(&mut self, backend: &B, k: usize, m: &[f32], v: &[f32]) {
        backend.write_f32(&mut self.m[k], m);
        backend.write_f32(&mut self.v[k], v);
    }

    /// Names and shapes of the state tensors, in order: for each parameter
    /// `<name>.exp_avg` then `<name>.exp_avg_sq`, both of the parameter's shape.
    pub fn state_tensor_names(&self, params: &ParamStore<B>) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::with_capacity(2 * self.ids.len());
        for id in &self.ids {
            let info = &params.info[id.0];
            out.push((exp_avg_name(&info.name), info.shape.clone()));
            out.push((exp_avg_sq_name(&info.name), info.shape.clone()));
        }
        out
    }

    /// Host copies of the moment buffers (see [`AdamW::state_tensor_names`] for names and order).
    /// The step count is [`AdamW::steps_taken`].
    pub fn state_tensors(&self, backend: &B, params: &ParamStore<B>) -> Vec<NamedTensor> {
        self.check_store(params);
        let mut out = Vec::with_capacity(2 * self.ids.len());
        for (k, id) in self.ids.iter().enumerate() {
            let info = &params.info[id.0];
            let n = info.numel();
            out.push(NamedTensor {
                name: exp_avg_name(&info.name),
                shape: info.shape.clone(),
                data: backend.to_f32_prefix(&self.m[k], n),
            });
            out.push(NamedTensor {
                name: exp_avg_sq_name(&info.name),
                shape: info.shape.clone(),
                data: backend.to_f32_prefix(&self.v[k], n),
            });
        }
        out
    }

    /// Restore moments and step count. `tensors` must hold exactly the names of
    /// [`AdamW::state_tensor_names`] (any order) with matching shapes; otherwise nothing is
    /// changed and the error names the offending tensor.
    pub fn load_state(&mut self, backend: &B, params: &ParamStore<B>, step: u64, tensors: &[NamedTensor]) -> Result<()> {
        self.check_store(params);
        let mut by_name: HashMap<&str, &NamedTensor> = HashMap::with_capacity(tensors.len());
        for t in tensors {
            if by_name.insert(t.name.as_str(), t).is_some() {
                bail!("optimizer state tensor {} given twice", t.name);
            }
        }
        let expected = self.state_tensor_names(params);
        for (name, shape) in &expected {
            let Some(t) = by_name.remove(name.as_str()) else {
                bail!("optimizer state tensor {name} is missing ({:?} group)", self.group);
            };
            let numel: usize = shape.iter().product();
            if &t.shape != shape || t.data.len() != numel {
                bail!(
                    "optimizer state tensor {name} has shape {:?} ({} values), expected {:?}",
                    t.shape,
                    t.data.len(),
                    shape
                );
            }
        }
        if let Some(extra) = by_name.keys().min() {
            bail!("unexpected optimizer state tensor {extra} for the {:?} group", self.group);
        }
        let lookup: HashMap<&str, &NamedTensor> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        for (k, id) in self.ids.iter().enumerate() {
            let name = &params.info[id.0].name;
            backend.write_f32(&mut self.m[k], &lookup[exp_avg_name(name).as_str()].data);
            backend.write_f32(&mut self.v[k], &lookup[exp_avg_sq_name(name).as_str()].data);
        }
        self.step = step;
        Ok(())
    }
}

/// Alias used by the checkpoint helpers.
pub type Optimizer<B> = AdamW<B>;
