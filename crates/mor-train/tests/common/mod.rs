//! Shared test helpers: the reference CPU backend and a small parameter-store builder.
#![allow(dead_code)]

use mor_engine::{Backend, ParamGroup, ParamId, ParamInfo, ParamStore};

pub type B = mor_engine::Cpu<f32>;

pub fn backend() -> B {
    mor_engine::Cpu::<f32>::new()
}

/// `(name, shape, decay, group, values)`
pub type Spec<'a> = (&'a str, &'a [usize], bool, ParamGroup, &'a [f32]);

pub fn store(b: &B, specs: &[Spec<'_>]) -> ParamStore<B> {
    let mut ps = ParamStore::new();
    for (name, shape, decay, group, values) in specs {
        ps.add(b, ParamInfo { name: name.to_string(), shape: shape.to_vec(), decay: *decay, group: *group }, values);
    }
    ps
}

pub fn id(ps: &ParamStore<B>, name: &str) -> ParamId {
    ps.find(name).unwrap_or_else(|| panic!("no parameter {name}"))
}

pub fn set_grad(b: &B, ps: &mut ParamStore<B>, name: &str, g: &[f32]) {
    let i = id(ps, name);
    b.write_f32(&mut ps.grads[i.0], g);
}

pub fn value(b: &B, ps: &ParamStore<B>, name: &str) -> Vec<f32> {
    b.to_f32(ps.value(id(ps, name)))
}

pub fn grad(b: &B, ps: &ParamStore<B>, name: &str) -> Vec<f32> {
    b.to_f32(ps.grad(id(ps, name)))
}

/// Deterministic pseudo-random values (no RNG dependency).
pub fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}
