//! The model's parameter tensors: names (Hugging Face style), shapes, initialisation, and which
//! tensors each unrolled layer position uses.
//!
//! Layout of names:
//! * `model.embed_tokens.weight` `[vocab, d]`, `model.norm.weight`, `lm_head.weight` (untied only)
//! * `model.layers.{s}.…` for parameter set `s` of the sharing map (vanilla: `s` = position):
//!   `input_layernorm`, `self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`,
//!   `mlp.{gate,up,down}_proj` (all `.weight`, `[out, in]`)
//! * untied attention (expert-choice compatibility mode): `model.recursions.{r}.layers.{j}.self_attn.*`
//!   for recursion `r`, block offset `j`
//! * routers: `model.routers.{r}.weight` (linear) or `model.routers.{r}.fc1.weight` /
//!   `fc2.weight` (MLP); expert-choice has one per recursion, token-choice one (`r` = 0);
//!   aux routers: `model.aux_routers.{r}.…`

use mor_config::{ModelConfig, RouterKind, Sampling, SharingMap};
use mor_engine::{Backend, ParamGroup, ParamId, ParamInfo, ParamStore};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Parameter ids used by one layer position.
#[derive(Debug, Clone, Copy)]
pub struct LayerWeights {
    pub attn_norm: ParamId,
    pub wq: ParamId,
    pub wk: ParamId,
    pub wv: ParamId,
    pub wo: ParamId,
    pub mlp_norm: ParamId,
    pub w_gate: ParamId,
    pub w_up: ParamId,
    pub w_down: ParamId,
}

/// A router: `Linear(d -> out)` or `Linear(d -> h) -> GELU -> Linear(h -> out)`.
#[derive(Debug, Clone, Copy)]
pub struct RouterWeights {
    pub fc1: ParamId,
    /// Present for MLP routers.
    pub fc2: Option<ParamId>,
    pub hidden: usize,
    pub out: usize,
}

pub struct Weights {
    pub embed: ParamId,
    pub final_norm: ParamId,
    pub lm_head: Option<ParamId>,
    /// Per layer position.
    pub layers: Vec<LayerWeights>,
    pub routers: Vec<RouterWeights>,
    pub aux_routers: Vec<RouterWeights>,
}

/// Deterministic N(0, std) initialiser.
struct Init {
    rng: ChaCha8Rng,
}

impl Init {
    fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box-Muller; u1 in (0, 1] so the log is finite.
                let u1: f64 = 1.0 - self.rng.gen::<f64>();
                let u2: f64 = self.rng.gen::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
            })
            .collect()
    }
}

fn matrix(name: String, rows: usize, cols: usize, group: ParamGroup) -> ParamInfo {
    ParamInfo { name, shape: vec![rows, cols], decay: true, group }
}

fn vector(name: String, n: usize) -> ParamInfo {
    ParamInfo { name, shape: vec![n], decay: false, group: ParamGroup::Main }
}

impl Weights {
    pub fn build<B: Backend>(
        backend: &B,
        cfg: &ModelConfig,
        map: &SharingMap,
        seed: u64,
        params: &mut ParamStore<B>,
    ) -> Weights {
        let mut init = Init { rng: ChaCha8Rng::seed_from_u64(seed) };
        let std = cfg.init_std;
        let (d, f, qd, kvd) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        let add_matrix = |params: &mut ParamStore<B>, init: &mut Init, name: String, rows, cols, group| {
            let values = init.normal(rows * cols, std);
            params.add(backend, matrix(name, rows, cols, group), &values)
        };

        let embed = add_matrix(params, &mut init, "model.embed_tokens.weight".into(), cfg.vocab_size, d, ParamGroup::Main);

        struct SetIds {
            attn_norm: ParamId,
            attn: [ParamId; 4],
            mlp_norm: ParamId,
            mlp: [ParamId; 3],
        }
        let mut sets = Vec::new();
        for s in 0..map.num_param_sets() {
            let p = format!("model.layers.{s}");
            let attn_norm = params.add(backend, vector(format!("{p}.input_layernorm.weight"), d), &vec![1.0; d]);
            let attn = [
                add_matrix(params, &mut init, format!("{p}.self_attn.q_proj.weight"), qd, d, ParamGroup::Main),
                add_matrix(params, &mut init, format!("{p}.self_attn.k_proj.weight"), kvd, d, ParamGroup::Main),
                add_matrix(params, &mut init, format!("{p}.self_attn.v_proj.weight"), kvd, d, ParamGroup::Main),
                add_matrix(params, &mut init, format!("{p}.self_attn.o_proj.weight"), d, qd, ParamGroup::Main),
            ];
            let mlp_norm = params.add(backend, vector(format!("{p}.post_attention_layernorm.weight"), d), &vec![1.0; d]);
            let mlp = [
                add_matrix(params, &mut init, format!("{p}.mlp.gate_proj.weight"), f, d, ParamGroup::Main),
                add_matrix(params, &mut init, format!("{p}.mlp.up_proj.weight"), f, d, ParamGroup::Main),
                add_matrix(params, &mut init, format!("{p}.mlp.down_proj.weight"), d, f, ParamGroup::Main),
            ];
            sets.push(SetIds { attn_norm, attn, mlp_norm, mlp });
        }

        // Untied attention: recursion r >= 1 gets its own q/k/v/o per block offset; recursion 0
        // keeps the shared set's (so the unique count grows by (N_r - 1) attention blocks).
        let untie = cfg.recursion.as_ref().is_some_and(|r| r.untie_attention);
        let mut untied: Vec<Vec<[ParamId; 4]>> = Vec::new();
        if untie {
            for r in 1..map.num_recursions {
                let mut per_offset = Vec::new();
                for j in 0..map.base_depth {
                    let p = format!("model.recursions.{r}.layers.{j}.self_attn");
                    per_offset.push([
                        add_matrix(params, &mut init, format!("{p}.q_proj.weight"), qd, d, ParamGroup::Main),
                        add_matrix(params, &mut init, format!("{p}.k_proj.weight"), kvd, d, ParamGroup::Main),
                        add_matrix(params, &mut init, format!("{p}.v_proj.weight"), kvd, d, ParamGroup::Main),
                        add_matrix(params, &mut init, format!("{p}.o_proj.weight"), d, qd, ParamGroup::Main),
                    ]);
                }
                untied.push(per_offset);
            }
        }

        let layers = (0..map.num_layers)
            .map(|l| {
                let set = &sets[map.param_set[l]];
                let mut attn = set.attn;
                if untie {
                    for r in 1..map.num_recursions {
                        let range = map.step_positions(r);
                        if range.contains(&l) {
                            attn = untied[r - 1][l - range.start];
                        }
                    }
                }
                LayerWeights {
                    attn_norm: set.attn_norm,
                    wq: attn[0],
                    wk: attn[1],
                    wv: attn[2],
                    wo: attn[3],
                    mlp_norm: set.mlp_norm,
                    w_gate: set.mlp[0],
                    w_up: set.mlp[1],
                    w_down: set.mlp[2],
                }
            })
            .collect();

        let final_norm = params.add(backend, vector("model.norm.weight".into(), d), &vec![1.0; d]);
        let lm_head = (!cfg.tie_embeddings)
            .then(|| add_matrix(params, &mut init, "lm_head.weight".into(), cfg.vocab_size, d, ParamGroup::Main));

        let mut routers = Vec::new();
        let mut aux_routers = Vec::new();
        if let Some(rc) = cfg.router.as_ref().filter(|r| !r.random) {
            let (count, out) = match rc.kind {
                RouterKind::Expert => (map.num_recursions, 1),
                RouterKind::Token => (1, map.num_recursions),
            };
            let hidden = rc.arch.hidden(d);
            let make = |params: &mut ParamStore<B>, init: &mut Init, prefix: &str, group| {
                (0..count)
                    .map(|r| {
                        let p = format!("{prefix}.{r}");
                        match hidden {
                            None => RouterWeights {
                                fc1: add_matrix(params, init, format!("{p}.weight"), out, d, group),
                                fc2: None,
                                hidden: 0,
                                out,
                            },
                            Some(h) => RouterWeights {
                                fc1: add_matrix(params, init, format!("{p}.fc1.weight"), h, d, group),
                                fc2: Some(add_matrix(params, init, format!("{p}.fc2.weight"), out, h, group)),
                                hidden: h,
                                out,
                            },
                        }
                    })
                    .collect::<Vec<_>>()
            };
            routers = make(params, &mut init, "model.routers", ParamGroup::Main);
            if rc.kind == RouterKind::Expert && rc.sampling == Sampling::AuxRouter {
                aux_routers = make(params, &mut init, "model.aux_routers", ParamGroup::AuxRouter);
            }
        }

        Weights { embed, final_norm, lm_head, layers, routers, aux_routers }
    }

    /// The LM head matrix (`[vocab, d]`): the embedding when tied.
    pub fn head(&self) -> ParamId {
        self.lm_head.unwrap_or(self.embed)
    }
}
