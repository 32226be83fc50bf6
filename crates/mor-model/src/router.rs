//! Router networks: `logits = R(x / temperature)` with `R` linear or a GELU MLP (MOR_SPEC 3.2).
//! The temperature divides the router input; since the first layer is linear we apply it to the
//! first layer's output instead, which is the same function.

use crate::weights::RouterWeights;
use mor_engine::{Backend, ParamStore};

/// Saved activations of one router application, sized for `cap` tokens.
pub struct RouterAct<B: Backend> {
    pub cap: usize,
    /// MLP: first-layer output (pre-GELU), `[n, hidden]`.
    pub pre: B::Buf,
    /// MLP: GELU output.
    pub hid: B::Buf,
    /// `[n, out]`.
    pub logits: B::Buf,
    /// Gradient of `logits`, filled by the caller before `router_backward`.
    pub dlogits: B::Buf,
    /// Scratch for the backward.
    pub dpre: B::Buf,
    pub dhid: B::Buf,
}

impl<B: Backend> RouterAct<B> {
    pub fn new(b: &B, w: &RouterWeights, cap: usize) -> Self {
        let h = w.hidden.max(1);
        RouterAct {
            cap,
            pre: b.zeros(cap * h),
            hid: b.zeros(cap * h),
            logits: b.zeros(cap * w.out),
            dlogits: b.zeros(cap * w.out),
            dpre: b.zeros(cap * h),
            dhid: b.zeros(cap * h),
        }
    }
}

pub fn router_forward<B: Backend>(
    b: &B,
    p: &ParamStore<B>,
    w: &RouterWeights,
    act: &mut RouterAct<B>,
    x: &B::Buf,
    n: usize,
    d: usize,
    temperature: f32,
) {
    let inv_t = 1.0 / temperature;
    match w.fc2 {
        None => {
            b.matmul_fwd(&mut act.logits, x, p.value(w.fc1), n, d, w.out);
            if inv_t != 1.0 {
                b.scale(&mut act.logits, inv_t, n * w.out);
            }
        }
        Some(fc2) => {
            b.matmul_fwd(&mut act.pre, x, p.value(w.fc1), n, d, w.hidden);
            if inv_t != 1.0 {
                b.scale(&mut act.pre, inv_t, n * w.hidden);
            }
            b.gelu_fwd(&mut act.hid, &act.pre, n * w.hidden);
            b.matmul_fwd(&mut act.logits, &act.hid, p.value(fc2), n, w.hidden, w.out);
        }
    }
}

/// Backward from `act.dlogits`; `dx` (when given) accumulates the input gradient. `act.dlogits`
/// is consumed (scaled in place).
#[allow(clippy::too_many_arguments)]
pub fn router_backward<B: Backend>(
    b: &B,
    p: &mut ParamStore<B>,
    w: &RouterWeights,
    act: &mut RouterAct<B>,
    x: &B::Buf,
    n: usize,
    d: usize,
    temperature: f32,
    dx: Option<&mut B::Buf>,
) {
    let inv_t = 1.0 / temperature;
    let ParamStore { values, grads, .. } = p;
    match w.fc2 {
        None => {
            if inv_t != 1.0 {
                b.scale(&mut act.dlogits, inv_t, n * w.out);
            }
            b.matmul_bwd(dx, &mut grads[w.fc1.0], &act.dlogits, x, &values[w.fc1.0], n, d, w.out);
        }
        Some(fc2) => {
            b.fill(&mut act.dhid, n * w.hidden, 0.0);
            b.matmul_bwd(Some(&mut act.dhid), &mut grads[fc2.0], &act.dlogits, &act.hid, &values[fc2.0], n, w.hidden, w.out);
            b.fill(&mut act.dpre, n * w.hidden, 0.0);
            b.gelu_bwd(&mut act.dpre, &act.dhid, &act.pre, n * w.hidden);
            if inv_t != 1.0 {
                b.scale(&mut act.dpre, inv_t, n * w.hidden);
            }
            b.matmul_bwd(dx, &mut grads[w.fc1.0], &act.dpre, x, &values[w.fc1.0], n, d, w.hidden);
        }
    }
}
