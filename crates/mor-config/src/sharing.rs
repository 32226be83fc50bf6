//! Which parameter set each unrolled layer position uses (MOR_SPEC 2.1), and how positions group
//! into recursion steps. The model, the parameter accounting and the tests all use this one map.

use crate::config::{invalid, ConfigError, Sharing};

/// Resolved layer layout of a (possibly recursive) model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharingMap {
    pub strategy: Option<Sharing>,
    pub num_layers: usize,
    pub num_recursions: usize,
    /// Layers in one recursion block.
    pub base_depth: usize,
    /// `param_set[l]`: index of the parameter set of layer position `l`. Sets are numbered
    /// unique-first layer (Middle variants) = 0, then the shared pool, then the unique last layer.
    pub param_set: Vec<usize>,
}

impl SharingMap {
    /// Every position its own parameters.
    pub fn vanilla(num_layers: usize) -> Self {
        SharingMap {
            strategy: None,
            num_layers,
            num_recursions: 1,
            base_depth: num_layers,
            param_set: (0..num_layers).collect(),
        }
    }

    pub fn new(strategy: Sharing, num_layers: usize, num_recursions: usize) -> Result<Self, ConfigError> {
        if num_recursions == 0 {
            return Err(invalid("model.recursion.num_recursions", "must be > 0"));
        }
        let middle = strategy.is_middle();
        let shared_positions = if middle {
            if num_layers < 2 + num_recursions {
                return Err(invalid(
                    "model.num_layers",
                    format!("middle sharing needs at least 2 + num_recursions ({}) layers", 2 + num_recursions),
                ));
            }
            num_layers - 2
        } else {
            num_layers
        };
        if shared_positions % num_recursions != 0 {
            let need = if middle { "num_layers - 2" } else { "num_layers" };
            return Err(invalid(
                "model.num_layers",
                format!(
                    "{need} = {shared_positions} is not divisible by num_recursions = {num_recursions} \
                     (the paper adds layers: use 1 + N_r * ceil((N_L - 2) / N_r) + 1)"
                ),
            ));
        }
        let base_depth = shared_positions / num_recursions;
        let offset = usize::from(middle);
        let param_set = (0..num_layers)
            .map(|l| {
                if middle && l == 0 {
                    return 0;
                }
                if middle && l == num_layers - 1 {
                    return base_depth + 1;
                }
                let p = l - offset;
                let pool = match strategy {
                    Sharing::Cycle | Sharing::MiddleCycle => p % base_depth,
                    Sharing::Sequence | Sharing::MiddleSequence => p / num_recursions,
                };
                pool + offset
            })
            .collect();
        Ok(SharingMap { strategy: Some(strategy), num_layers, num_recursions, base_depth, param_set })
    }

    /// Number of distinct parameter sets (`base_depth`, + 2 for Middle variants).
    pub fn num_param_sets(&self) -> usize {
        self.param_set.iter().copied().max().map_or(0, |m| m + 1)
    }

    /// Unique layer positions before the recursion blocks (1 for Middle variants).
    pub fn prefix_len(&self) -> usize {
        usize::from(self.strategy.is_some_and(|s| s.is_middle()))
    }

    /// Layer positions `start..end` of recursion step `r` (0-based). Only meaningful for cycle
    /// strategies, where each recursion is a contiguous block.
    pub fn step_positions(&self, r: usize) -> std::ops::Range<usize> {
        let start = self.prefix_len() + r * self.base_depth;
        start..start + self.base_depth
    }

    /// Unique layer positions after the recursion blocks.
    pub fn suffix_positions(&self) -> std::ops::Range<usize> {
        let start = self.prefix_len() + self.num_recursions * self.base_depth;
        start..self.num_layers
    }
}
