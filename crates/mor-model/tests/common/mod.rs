//! Test support: tiny configs of every variant, and an independent reference forward in plain
//! f64 loops that follows MOR_SPEC directly (full-sequence execution with explicit attention
//! masks instead of compaction), reading the model's weights by name.
#![allow(dead_code)]

use mor_config::*;
use mor_engine::Cpu;
use mor_model::Model;

pub type F64 = Cpu<f64>;

pub fn tiny_model(layers: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 37,
        hidden_size: 16,
        num_layers: layers,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        intermediate_size: 24,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_seq_len: 64,
        tie_embeddings: true,
        init_std: 0.3,
        recursion: None,
        router: None,
    }
}

pub fn recursion(sharing: Sharing, n_r: usize, kv: KvMode) -> Option<RecursionConfig> {
    Some(RecursionConfig { sharing, num_recursions: n_r, kv_mode: kv, untie_attention: false })
}

pub fn router(kind: RouterKind) -> RouterConfig {
    RouterConfig {
        kind,
        arch: RouterArch::Linear,
        activation: None,
        alpha: None,
        temperature: 1.0,
        capacities: None,
        capacity_warmup: 0,
        sampling: Sampling::AuxLoss,
        aux_coeff: 0.001,
        aux_router_lr_mult: 10.0,
        z_coeff: None,
        random: false,
        combine: Combine::Add,
        balancing: Balancing::Loss,
        balance_coeff: 0.1,
        bias_update_rate: 0.001,
    }
}

/// Every model variant, named, on tiny dimensions.
pub fn variants() -> Vec<(String, ModelConfig)> {
    let mut out = Vec::new();
    out.push(("vanilla".to_string(), tiny_model(3)));
    let mut untied = tiny_model(3);
    untied.tie_embeddings = false;
    out.push(("vanilla-untied-head".to_string(), untied));
    for (name, sharing, layers) in [
        ("cycle", Sharing::Cycle, 4),
        ("seq", Sharing::Sequence, 4),
        ("mcycle", Sharing::MiddleCycle, 6),
        ("mseq", Sharing::MiddleSequence, 6),
    ] {
        let mut c = tiny_model(layers);
        c.recursion = recursion(sharing, 2, KvMode::RecursionWise);
        out.push((format!("rec2-{name}"), c));
    }
    for sharing in [Sharing::Cycle, Sharing::MiddleCycle] {
        let mut c = tiny_model(if sharing == Sharing::Cycle { 4 } else { 6 });
        c.recursion = recursion(sharing, 2, KvMode::Share);
        out.push((format!("rec2-{sharing:?}-kvshare"), c));
    }
    let ec = |f: &dyn Fn(&mut ModelConfig, &mut RouterConfig)| {
        let mut c = tiny_model(5);
        c.recursion = recursion(Sharing::MiddleCycle, 3, KvMode::RecursionWise);
        let mut r = router(RouterKind::Expert);
        f(&mut c, &mut r);
        c.router = Some(r);
        c
    };
    out.push(("ec3".into(), ec(&|_, _| {})));
    out.push(("ec3-mlp-tanh".into(), ec(&|_, r| {
        r.arch = RouterArch::Mlp;
        r.activation = Some(RouterActivation::Tanh);
        r.temperature = 0.7;
    })));
    out.push(("ec3-wide-none-z".into(), ec(&|_, r| {
        r.arch = RouterArch::WideMlp;
        r.activation = Some(RouterActivation::None);
        r.z_coeff = Some(0.01);
        r.aux_coeff = 0.05;
    })));
    out.push(("ec3-aux-router".into(), ec(&|_, r| r.sampling = Sampling::AuxRouter)));
    out.push(("ec3-kvshare".into(), ec(&|c, _| c.recursion.as_mut().unwrap().kv_mode = KvMode::Share)));
    out.push(("ec3-untied-attn".into(), ec(&|c, _| c.recursion.as_mut().unwrap().untie_attention = true)));
    out.push(("ec3-replace".into(), ec(&|_, r| r.combine = Combine::Replace)));
    out.push(("ec3-random".into(), ec(&|_, r| r.random = true)));
    out.push(("ec2-cycle".into(), {
        let mut c = tiny_model(4);
        c.recursion = recursion(Sharing::Cycle, 2, KvMode::RecursionWise);
        c.router = Some(router(RouterKind::Expert));
        c
    }));
    let tc = |f: &dyn Fn(&mut ModelConfig, &mut RouterConfig)| {
        let mut c = tiny_model(5);
        c.recursion = recursion(Sharing::MiddleCycle, 3, KvMode::RecursionWise);
        let mut r = router(RouterKind::Token);
        f(&mut c, &mut r);
        c.router = Some(r);
        c
    };
    out.push(("tc3".into(), tc(&|_, r| r.z_coeff = Some(0.01))));
    out.push(("tc3-sigmoid-mlp".into(), tc(&|_, r| {
        r.activation = Some(RouterActivation::Sigmoid);
        r.arch = RouterArch::Mlp;
    })));
    out.push(("tc3-lossfree".into(), tc(&|_, r| r.balancing = Balancing::LossFree)));
    out.push(("tc3-kvshare".into(), tc(&|c, _| c.recursion.as_mut().unwrap().kv_mode = KvMode::Share)));
    for (_, c) in &out {
        c.validate().unwrap();
    }
    out
}

/// Deterministic pseudo-random tokens.
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Reference forward

pub struct Ref<'a> {
    pub model: &'a Model<F64>,
    pub b: &'a F64,
}

pub type Mat = Vec<Vec<f64>>;

impl<'a> Ref<'a> {
    pub fn w(&self, name: &str) -> Vec<f64> {
        let id = self.model.params.find(name).unwrap_or_else(|| panic!("no tensor {name}"));
        self.model.params.value(id).clone()
    }

    pub fn linear(&self, x: &[f64], w: &[f64], out: usize) -> Vec<f64> {
        let inp = x.len();
        (0..out).map(|o| (0..inp).map(|i| w[o * inp + i] * x[i]).sum()).collect()
    }

    pub fn rmsnorm(&self, x: &[f64], w: &[f64]) -> Vec<f64> {
        let eps = self.model.cfg.rms_norm_eps;
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + eps).sqrt();
        x.iter().zip(w).map(|(v, w)| v * r * w).collect()
    }

    pub fn rope(&self, x: &mut [f64], heads: usize, pos: usize) {
        let hd = self.model.cfg.head_dim;
        let theta = self.model.cfg.rope_theta;
        for h in 0..heads {
            let v = &mut x[h * hd..(h + 1) * hd];
            for j in 0..hd / 2 {
                let ang = pos as f64 * theta.powf(-2.0 * j as f64 / hd as f64);
                let (s, c) = ang.sin_cos();
                let (a, b) = (v[j], v[j + hd / 2]);
                v[j] = a * c - b * s;
                v[j + hd / 2] = b * c + a * s;
            }
        }
    }

    /// Names of the tensors used at layer position `pos` (mirrors the documented layout).
    pub fn layer_names(&self, pos: usize) -> (String, String) {
        let map = &self.model.map;
        let set = map.param_set[pos];
        let base = format!("model.layers.{set}");
        let mut attn = format!("{base}.self_attn");
        if self.model.cfg.recursion.as_ref().is_some_and(|r| r.untie_attention) {
            for r in 1..map.num_recursions {
                let range = map.step_positions(r);
                if range.contains(&pos) {
                    attn = format!("model.recursions.{r}.layers.{}.self_attn", pos - range.start);
                }
            }
        }
        (base, attn)
    }

    /// K/V (post-RoPE) of every row of `x` at position `pos` (row index = position).
    pub fn kv(&self, layer: usize, x: &Mat) -> (Mat, Mat) {
        let c = &self.model.cfg;
        let (base, attn) = self.layer_names(layer);
        let n1 = self.w(&format!("{base}.input_layernorm.weight"));
        let (wk, wv) = (self.w(&format!("{attn}.k_proj.weight")), self.w(&format!("{attn}.v_proj.weight")));
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (t, row) in x.iter().enumerate() {
            let xn = self.rmsnorm(row, &n1);
            let mut k = self.linear(&xn, &wk, c.kv_dim());
            self.rope(&mut k, c.num_kv_heads, t);
            ks.push(k);
            vs.push(self.linear(&xn, &wv, c.kv_dim()));
        }
        (ks, vs)
    }

    /// One decoder layer on a full row `x` (row index = position); query `i` sees key `j` iff
    /// `mask(i, j)`. Keys/values come from `kv` when given (KV sharing), else from `x`.
    pub fn layer(&self, layer: usize, x: &Mat, mask: &dyn Fn(usize, usize) -> bool, kv: Option<&(Mat, Mat)>) -> Mat {
        let c = &self.model.cfg;
        let (base, attn) = self.layer_names(layer);
        let n1 = self.w(&format!("{base}.input_layernorm.weight"));
        let n2 = self.w(&format!("{base}.post_attention_layernorm.weight"));
        let wq = self.w(&format!("{attn}.q_proj.weight"));
        let wo = self.w(&format!("{attn}.o_proj.weight"));
        let (wg, wu, wd) = (
            self.w(&format!("{base}.mlp.gate_proj.weight")),
            self.w(&format!("{base}.mlp.up_proj.weight")),
            self.w(&format!("{base}.mlp.down_proj.weight")),
        );
        let own;
        let (ks, vs) = match kv {
            Some(kv) => (&kv.0, &kv.1),
            None => {
                own = self.kv(layer, x);
                (&own.0, &own.1)
            }
        };
        let hd = c.head_dim;
        let group = c.num_heads / c.num_kv_heads;
        let mut out = Vec::new();
        for (i, row) in x.iter().enumerate() {
            let xn = self.rmsnorm(row, &n1);
            let mut q = self.linear(&xn, &wq, c.q_dim());
            self.rope(&mut q, c.num_heads, i);
            let mut att = vec![0.0; c.q_dim()];
            for h in 0..c.num_heads {
                let kh = h / group;
                let keys: Vec<usize> = (0..ks.len()).filter(|&j| mask(i, j)).collect();
                if keys.is_empty() {
                    continue;
                }
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| (0..hd).map(|e| q[h * hd + e] * ks[j][kh * hd + e]).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
                for (s, &j) in scores.iter().zip(&keys) {
                    let p = (s - mx).exp() / z;
                    for e in 0..hd {
                        att[h * hd + e] += p * vs[j][kh * hd + e];
                    }
                }
            }
            let o = self.linear(&att, &wo, c.hidden_size);
            let a: Vec<f64> = row.iter().zip(&o).map(|(x, o)| x + o).collect();
            let xn2 = self.rmsnorm(&a, &n2);
            let g = self.linear(&xn2, &wg, c.intermediate_size);
            let u = self.linear(&xn2, &wu, c.intermediate_size);
            let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let dn = self.linear(&act, &wd, c.hidden_size);
            out.push(a.iter().zip(&dn).map(|(a, d)| a + d).collect());
        }
        out
    }

    pub fn causal(i: usize, j: usize) -> bool {
        j <= i
    }

    pub fn embed(&self, ids: &[u32]) -> Mat {
        let d = self.model.cfg.hidden_size;
        let e = self.w("model.embed_tokens.weight");
        ids.iter().map(|&t| e[t as usize * d..(t as usize + 1) * d].to_vec()).collect()
    }

    /// Mean cross-entropy of one row's final hidden states.
    pub fn head_ce(&self, h: &Mat, targets: &[u32]) -> (f64, Vec<f64>) {
        let c = &self.model.cfg;
        let nw = self.w("model.norm.weight");
        let head = if c.tie_embeddings { self.w("model.embed_tokens.weight") } else { self.w("lm_head.weight") };
        let mut losses = Vec::new();
        for (row, &t) in h.iter().zip(targets) {
            let xn = self.rmsnorm(row, &nw);
            let logits = self.linear(&xn, &head, c.vocab_size);
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + logits.iter().map(|l| (l - mx).exp()).sum::<f64>().ln();
            losses.push(lse - logits[t as usize]);
        }
        (losses.iter().sum::<f64>() / losses.len() as f64, losses)
    }

    /// Router logits (`out` per token) of router `prefix` on rows `x`.
    pub fn router(&self, prefix: &str, x: &[f64], out: usize) -> Vec<f64> {
        let rc = self.model.cfg.router.as_ref().unwrap();
        let d = x.len();
        // The engine receives scalars as f32: use exactly the scale the model applies.
        let inv_t = (1.0f32 / rc.temperature as f32) as f64;
        let xs: Vec<f64> = x.iter().map(|v| v * inv_t).collect();
        match rc.arch.hidden(d) {
            None => self.linear(&xs, &self.w(&format!("{prefix}.weight")), out),
            Some(hdim) => {
                let pre = self.linear(&xs, &self.w(&format!("{prefix}.fc1.weight")), hdim);
                let hid: Vec<f64> = pre.iter().map(|&v| 0.5 * v * (1.0 + erf(v / 2f64.sqrt()))).collect();
                self.linear(&hid, &self.w(&format!("{prefix}.fc2.weight")), out)
            }
        }
    }
}

pub fn erf(x: f64) -> f64 {
    libm::erf(x)
}

/// Reference losses of a batch of rows: (objective, mean CE, per-token CE, depth per token).
pub struct RefOut {
    pub loss: f64,
    pub ce: f64,
    pub token_ce: Vec<f64>,
    pub depth: Vec<u8>,
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn bce(x: f64, t: f64) -> f64 {
    x.max(0.0) - x * t + (1.0 + (-x.abs()).exp()).ln()
}

impl<'a> Ref<'a> {
    /// Recursion step `r`'s layers on a full row; rows not `active` never serve as keys (their
    /// outputs are garbage and must be ignored by the caller).
    fn block(&self, r: usize, x: &Mat, active: &[bool], kv_cache: &mut Vec<(Mat, Mat)>) -> Mat {
        let share = self.model.cfg.kv_mode() == KvMode::Share;
        let mut y = x.clone();
        for (j, pos) in self.model.map.step_positions(r).enumerate() {
            if share && r > 0 {
                y = self.layer(pos, &y, &|i, k| k <= i, Some(&kv_cache[j]));
            } else {
                if share {
                    kv_cache.push(self.kv(pos, &y));
                }
                y = self.layer(pos, &y, &|i, k| active[i] && active[k] && k <= i, None);
            }
        }
        y
    }

    /// The whole model on `rows` (each a full sequence), following MOR_SPEC literally.
    pub fn forward(&self, rows: &[Vec<u32>], targets: &[Vec<u32>]) -> RefOut {
        let cfg = &self.model.cfg;
        let map = &self.model.map;
        let len = rows[0].len();
        let mut hs: Vec<Mat> = rows.iter().map(|r| self.embed(r)).collect();
        let mut depth: Vec<Vec<u8>> = vec![vec![map.num_recursions as u8; len]; rows.len()];
        let mut aux = 0.0;
        let contiguous = matches!(map.strategy, Some(Sharing::Cycle) | Some(Sharing::MiddleCycle));
        let all = vec![true; len];
        if !contiguous {
            for h in hs.iter_mut() {
                for pos in 0..map.num_layers {
                    *h = self.layer(pos, h, &Self::causal, None);
                }
            }
        } else {
            for h in hs.iter_mut() {
                for pos in 0..map.prefix_len() {
                    *h = self.layer(pos, h, &Self::causal, None);
                }
            }
            let n_r = map.num_recursions;
            match cfg.router.as_ref().map(|r| r.kind) {
                None => {
                    for h in hs.iter_mut() {
                        let mut cache = Vec::new();
                        for r in 0..n_r {
                            *h = self.block(r, h, &all, &mut cache);
                        }
                    }
                }
                Some(RouterKind::Expert) => {
                    let rc = cfg.router.as_ref().unwrap();
                    let alpha = rc.alpha() as f32 as f64; // crosses the engine interface as f32
                    for (row, h) in hs.iter_mut().enumerate() {
                        let mut cand: Vec<usize> = (0..len).collect();
                        let mut cache = Vec::new();
                        depth[row] = vec![0; len];
                        for r in 0..n_r {
                            let logits: Vec<f64> = cand.iter().map(|&t| self.router(&format!("model.routers.{r}"), &h[t], 1)[0]).collect();
                            let g: Vec<f64> = logits
                                .iter()
                                .map(|&l| match rc.activation() {
                                    RouterActivation::Sigmoid => alpha * sig(l),
                                    RouterActivation::Tanh => alpha * l.tanh(),
                                    _ => l,
                                })
                                .collect();
                            let k = capacity_tokens(rc.capacity(r, n_r), len);
                            let mut order: Vec<usize> = (0..cand.len()).collect();
                            order.sort_by(|&a, &b| g[b].partial_cmp(&g[a]).unwrap().then(a.cmp(&b)));
                            let mut chosen: Vec<usize> = order[..k].to_vec();
                            chosen.sort();
                            let mut targets = vec![0.0; cand.len()];
                            for &c in &chosen {
                                targets[c] = 1.0;
                            }
                            let b: f64 = logits.iter().zip(&targets).map(|(&l, &t)| bce(l, t)).sum::<f64>() / cand.len() as f64;
                            let z: f64 = logits.iter().map(|l| l * l).sum::<f64>() / cand.len() as f64;
                            if rc.sampling == Sampling::AuxLoss {
                                aux += rc.aux_coeff * b / rows.len() as f64;
                            }
                            aux += rc.z_coeff() * z / rows.len() as f64;
                            let sel: Vec<usize> = chosen.iter().map(|&c| cand[c]).collect();
                            let mut active = vec![false; len];
                            for &t in &sel {
                                active[t] = true;
                                depth[row][t] += 1;
                            }
                            let y = self.block(r, h, &active, &mut cache);
                            for (&c, &t) in chosen.iter().zip(&sel) {
                                match rc.combine {
                                    Combine::Add => {
                                        for e in 0..h[t].len() {
                                            h[t][e] += g[c] * y[t][e];
                                        }
                                    }
                                    Combine::Replace => h[t] = y[t].clone(),
                                }
                            }
                            cand = sel;
                        }
                    }
                }
                Some(RouterKind::Token) => {
                    let rc = cfg.router.as_ref().unwrap();
                    let alpha = rc.alpha();
                    let n_tok = (rows.len() * len) as f64;
                    let mut probs: Vec<Vec<Vec<f64>>> = Vec::new();
                    let mut counts = vec![0usize; n_r];
                    let mut z = 0.0;
                    for (row, h) in hs.iter().enumerate() {
                        let mut pr = Vec::new();
                        for t in 0..len {
                            let l = self.router("model.routers.0", &h[t], n_r);
                            let mx = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let s: f64 = l.iter().map(|v| (v - mx).exp()).sum();
                            z += (mx + s.ln()).powi(2) / n_tok;
                            let p: Vec<f64> = if rc.activation() == RouterActivation::Softmax {
                                l.iter().map(|v| alpha * (v - mx).exp() / s).collect()
                            } else {
                                l.iter().map(|&v| alpha * sig(v)).collect()
                            };
                            let bias = &self.model.router_state.bias;
                            let mut best = 0;
                            for j in 1..n_r {
                                if p[j] + bias[j] > p[best] + bias[best] {
                                    best = j;
                                }
                            }
                            depth[row][t] = best as u8 + 1;
                            counts[best] += 1;
                            pr.push(p);
                        }
                        probs.push(pr);
                    }
                    let bal: f64 = (0..n_r)
                        .map(|j| {
                            let f = n_r as f64 * counts[j] as f64 / n_tok;
                            let p: f64 = probs.iter().flatten().map(|p| p[j]).sum::<f64>() / n_tok;
                            f * p
                        })
                        .sum();
                    if rc.balancing == Balancing::Loss {
                        aux += rc.balance_coeff * bal;
                    }
                    aux += rc.z_coeff() * z;
                    for (row, h) in hs.iter_mut().enumerate() {
                        let h1 = h.clone();
                        let mut x = h1.clone();
                        let mut out = h1.clone();
                        let mut cache = Vec::new();
                        for r in 0..n_r {
                            let active: Vec<bool> = (0..len).map(|t| depth[row][t] as usize > r).collect();
                            let y = self.block(r, &x, &active, &mut cache);
                            for t in 0..len {
                                if depth[row][t] as usize == r + 1 {
                                    let w = probs[row][t][r];
                                    out[t] = h1[t].iter().zip(&y[t]).map(|(a, b)| a + w * b).collect();
                                } else if active[t] {
                                    x[t] = y[t].clone();
                                }
                            }
                        }
                        *h = out;
                    }
                }
            }
            for h in hs.iter_mut() {
                for pos in map.suffix_positions() {
                    *h = self.layer(pos, h, &Self::causal, None);
                }
            }
        }
        let mut token_ce = Vec::new();
        for (h, t) in hs.iter().zip(targets) {
            token_ce.extend(self.head_ce(h, t).1);
        }
        let ce = token_ce.iter().sum::<f64>() / token_ce.len() as f64;
        RefOut { loss: ce + aux, ce, token_ce, depth: depth.concat() }
    }
}
