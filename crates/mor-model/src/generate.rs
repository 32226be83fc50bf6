//! Text generation by full recomputation: every new token re-runs the prefix with causal
//! routing (per-token threshold decisions for expert-choice, argmax depths for token-choice).
//! Simple and exact; the KV-cached decoder with depth-wise batching is the serving path.

use crate::model::{Batch, Model, Routing};
use mor_engine::Backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy)]
pub enum Sampler {
    Greedy,
    /// Temperature and nucleus (top-p) sampling with a seed.
    Sample { temperature: f32, top_p: f32, seed: u64 },
}

/// Generated ids and, for every position of prompt + output, the recursions it took.
pub struct Generation {
    pub ids: Vec<u32>,
    pub depths: Vec<u8>,
}

impl<B: Backend> Model<B> {
    /// Logits of the last position of `ids` under causal routing.
    pub fn next_logits(&mut self, b: &B, ids: &[u32]) -> anyhow::Result<Vec<f32>> {
        anyhow::ensure!(!ids.is_empty(), "generation needs at least one prompt token");
        let targets = vec![u32::MAX; ids.len()];
        let batch = Batch { inputs: ids, targets: &targets, batch: 1, seq_len: ids.len(), doc_starts: None };
        self.forward(b, &batch, Routing::Threshold, false, 1.0)?;
        Ok(self.last_hidden_logits(b))
    }

    /// Continue `prompt` by up to `max_new` tokens (stopping early at `stop`), keeping the
    /// context within `max_seq_len` by dropping the oldest tokens.
    pub fn generate(
        &mut self,
        b: &B,
        prompt: &[u32],
        max_new: usize,
        sampler: Sampler,
        stop: Option<u32>,
        mut on_token: impl FnMut(u32),
    ) -> anyhow::Result<Generation> {
        let mut ids = prompt.to_vec();
        let mut rng = match sampler {
            Sampler::Sample { seed, .. } => ChaCha8Rng::seed_from_u64(seed),
            Sampler::Greedy => ChaCha8Rng::seed_from_u64(0),
        };
        for _ in 0..max_new {
            let start = ids.len().saturating_sub(self.cfg.max_seq_len);
            let logits = self.next_logits(b, &ids[start..])?;
            let next = sample(&logits, sampler, &mut rng);
            ids.push(next);
            on_token(next);
            if Some(next) == stop {
                break;
            }
        }
        // Depths of the whole sequence as the model routes it causally.
        let start = ids.len().saturating_sub(self.cfg.max_seq_len);
        self.next_logits(b, &ids[start..])?;
        let mut depths = vec![0u8; start];
        depths.extend_from_slice(self.token_depths());
        Ok(Generation { ids: ids[prompt.len()..].to_vec(), depths })
    }
}

fn sample(logits: &[f32], sampler: Sampler, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |a, (i, &v)| if v > a.1 { (i, v) } else { a }).0 as u32;
    match sampler {
        Sampler::Greedy => argmax(),
        Sampler::Sample { temperature, top_p, .. } => {
            if temperature <= 0.0 {
                return argmax();
            }
            let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut probs: Vec<(usize, f64)> =
                logits.iter().enumerate().map(|(i, &l)| (i, (((l - mx) / temperature) as f64).exp())).collect();
            let z: f64 = probs.iter().map(|p| p.1).sum();
            probs.iter_mut().for_each(|p| p.1 /= z);
            probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            let mut keep = 0;
            let mut mass = 0.0;
            while keep < probs.len() && (keep == 0 || mass < top_p as f64) {
                mass += probs[keep].1;
                keep += 1;
            }
            let u: f64 = rng.gen::<f64>() * mass;
            let mut acc = 0.0;
            for &(i, p) in &probs[..keep] {
                acc += p;
                if u < acc {
                    return i as u32;
                }
            }
            probs[keep - 1].0 as u32
        }
    }
}
