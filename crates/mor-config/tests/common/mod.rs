//! Test helpers: models built from the MOR_SPEC 1.2 dimensions, independently of the presets.
#![allow(dead_code)]

use mor_config::*;

pub struct Dims {
    pub layers: usize,
    pub d: usize,
    pub heads: usize,
    pub kv: usize,
    pub inter: usize,
}

pub const D135: Dims = Dims { layers: 30, d: 576, heads: 9, kv: 3, inter: 1536 };
pub const D360: Dims = Dims { layers: 32, d: 960, heads: 15, kv: 5, inter: 2560 };
pub const D730: Dims = Dims { layers: 26, d: 1536, heads: 24, kv: 8, inter: 4096 };
pub const D1700: Dims = Dims { layers: 24, d: 2048, heads: 32, kv: 32, inter: 8192 };

pub fn vanilla(dims: &Dims) -> ModelConfig {
    let text = format!(
        "vocab_size = 49152\nhidden_size = {}\nnum_layers = {}\nnum_heads = {}\nnum_kv_heads = {}\n\
         intermediate_size = {}\n",
        dims.d, dims.layers, dims.heads, dims.kv, dims.inter
    );
    let m: ModelConfig = toml::from_str(&text).unwrap();
    m.validate().unwrap();
    m
}

pub fn recursion(sharing: Sharing, n: usize) -> RecursionConfig {
    RecursionConfig { sharing, num_recursions: n, kv_mode: KvMode::RecursionWise, untie_attention: false }
}

/// A router table parsed from TOML so that the schema defaults apply.
pub fn router(toml_body: &str) -> RouterConfig {
    toml::from_str(toml_body).unwrap()
}

/// Middle-cycle model with `layers` unrolled positions and `n` recursions.
pub fn middle_cycle(dims: &Dims, layers: usize, n: usize, router_toml: Option<&str>) -> ModelConfig {
    let mut m = vanilla(dims);
    m.num_layers = layers;
    m.recursion = Some(recursion(Sharing::MiddleCycle, n));
    m.router = router_toml.map(router);
    m.validate().unwrap();
    m
}

pub fn expert() -> Option<&'static str> {
    Some("kind = \"expert\"")
}

pub fn token() -> Option<&'static str> {
    Some("kind = \"token\"")
}
