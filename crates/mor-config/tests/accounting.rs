//! MOR_SPEC 11 invariants 1, 2, 3 (parameter counts) and 24 (iso-FLOP step counts).

mod common;
use common::*;
use mor_config::accounting::*;
use mor_config::*;

fn counts(m: &ModelConfig) -> ParamCounts {
    m.param_counts().unwrap()
}

// ---- Invariant 1: per-layer formula and vanilla sizes --------------------------------------

#[test]
fn inv1_per_layer_formula() {
    let m = vanilla(&D360);
    // d·(N_head·64) + 2·d·(N_KV·64) + (N_head·64)·d + 3·d·d_inter + 2·d
    let expected = 960 * 960 + 2 * 960 * 320 + 960 * 960 + 3 * 960 * 2560 + 2 * 960;
    assert_eq!(layer_params(&m), expected);
    assert_eq!(attention_params(&m) + mlp_params(&m) + layer_norm_params(&m), expected);
}

#[test]
fn inv1_vanilla_360m() {
    let c = counts(&vanilla(&D360));
    assert_eq!(c.non_embedding, 314_635_200);
    assert_eq!(c.embedding, 47_185_920);
    assert_eq!(c.router, 0);
    assert_eq!(c.total, 361_821_120);
}

#[test]
fn inv1_vanilla_other_sizes() {
    let c = counts(&vanilla(&D135));
    assert_eq!((c.non_embedding, c.embedding, c.total), (106_203_456, 28_311_552, 134_515_008));
    let c = counts(&vanilla(&D730));
    assert_eq!((c.non_embedding, c.embedding, c.total), (654_392_832, 75_497_472, 729_890_304));
    let c = counts(&vanilla(&D1700));
    assert_eq!((c.non_embedding, c.embedding, c.total), (1_610_713_088, 100_663_296, 1_711_376_384));
}

#[test]
fn untied_head_counts_in_embedding() {
    let mut m = vanilla(&D360);
    m.tie_embeddings = false;
    let c = counts(&m);
    assert_eq!(c.non_embedding, 314_635_200);
    assert_eq!(c.embedding, 2 * 47_185_920);
    assert_eq!(c.total, 314_635_200 + 2 * 47_185_920);
    // Recursive baseline of the released code (untied head, MOR_SPEC 10.3).
    let mut r = middle_cycle(&D360, 32, 3, None);
    r.tie_embeddings = false;
    assert_eq!(counts(&r).total, 212_360_640);
    let mut r = middle_cycle(&D360, 32, 2, None);
    r.tie_embeddings = false;
    assert_eq!(counts(&r).total, 261_522_240);
    let mut r = middle_cycle(&D360, 34, 4, None);
    r.tie_embeddings = false;
    assert_eq!(counts(&r).total, 192_696_000);
}

// ---- Invariant 2: middle-cycle unique parameters ------------------------------------------

#[test]
fn inv2_middle_cycle_360m() {
    for (layers, n, expected) in [(32, 2, 167_150_400), (32, 3, 117_988_800), (34, 4, 98_324_160)] {
        for router in [None, expert(), token()] {
            let m = middle_cycle(&D360, layers, n, router);
            assert_eq!(counts(&m).non_embedding, expected, "N_r={n} router={router:?}");
        }
    }
}

#[test]
fn inv2_middle_cycle_other_sizes() {
    assert_eq!(counts(&middle_cycle(&D135, 32, 3, expert())).non_embedding, 42_481_728);
    assert_eq!(counts(&middle_cycle(&D730, 26, 3, expert())).non_embedding, 251_690_496);
    assert_eq!(counts(&middle_cycle(&D1700, 26, 3, expert())).non_embedding, 671_131_648);
    assert_eq!(counts(&middle_cycle(&D1700, 24, 2, expert())).non_embedding, 872_470_528);
}

#[test]
fn inv2_untied_attention_compat() {
    for (layers, n, expected) in [(32, 2, 204_014_400), (32, 3, 167_140_800), (34, 4, 157_306_560)] {
        let mut m = middle_cycle(&D360, layers, n, expert());
        m.recursion.as_mut().unwrap().untie_attention = true;
        m.validate().unwrap();
        assert_eq!(counts(&m).non_embedding, expected, "N_r={n}");
    }
    // KV-share N_r=3 in compatibility mode: same count.
    let mut m = middle_cycle(&D360, 32, 3, expert());
    let rec = m.recursion.as_mut().unwrap();
    rec.untie_attention = true;
    rec.kv_mode = KvMode::Share;
    m.validate().unwrap();
    assert_eq!(counts(&m).non_embedding, 167_140_800);
}

// ---- Invariant 3: router parameters --------------------------------------------------------

#[test]
fn inv3_router_params() {
    // Expert linear: N_r·d.
    let m = middle_cycle(&D360, 32, 3, expert());
    assert_eq!(router_params(&m), 2_880);
    let c = counts(&m);
    assert_eq!(c.router, 2_880);
    assert_eq!(c.total, 117_988_800 + 47_185_920 + 2_880);
    // Token-choice linear: d·N_r.
    assert_eq!(router_params(&middle_cycle(&D360, 32, 3, token())), 2_880);
    assert_eq!(router_params(&middle_cycle(&D360, 32, 2, token())), 1_920);
    // MLP router per step: 2d² + 2d = 1,845,120 at d = 960.
    let mlp = middle_cycle(&D360, 32, 3, Some("kind = \"expert\"\narch = \"mlp\""));
    assert_eq!(router_params(&mlp), 3 * 1_845_120);
    assert_eq!(2 * 960 * 960 + 2 * 960, 1_845_120);
    let one_step = middle_cycle(&D360, 32, 1, Some("kind = \"expert\"\narch = \"mlp\""));
    assert_eq!(router_params(&one_step), 1_845_120);
    // Token-choice MLP: d·2d + 2d·N_r.
    let tmlp = middle_cycle(&D360, 32, 3, Some("kind = \"token\"\narch = \"mlp\""));
    assert_eq!(router_params(&tmlp), 960 * 1920 + 1920 * 3);
    // Wide MLP (paper: 4d hidden).
    let wide = middle_cycle(&D360, 32, 3, Some("kind = \"expert\"\narch = \"wide_mlp\""));
    assert_eq!(router_params(&wide), 3 * (960 * 3840 + 3840));
    // Random router: no parameters. Aux router: a second set per step.
    let random = middle_cycle(&D360, 32, 3, Some("kind = \"expert\"\nrandom = true"));
    assert_eq!(router_params(&random), 0);
    let aux = middle_cycle(&D360, 32, 3, Some("kind = \"expert\"\nsampling = \"aux_router\""));
    assert_eq!(router_params(&aux), 2 * 2_880);
    // Routers never enter non_embedding.
    assert_eq!(counts(&aux).non_embedding, 117_988_800);
    // No router: 0.
    assert_eq!(router_params(&middle_cycle(&D360, 32, 3, None)), 0);
}

// ---- Invariant 24: iso-FLOP step counts ------------------------------------------------------

const BUDGET: f64 = 16.5e18;
const TOKENS_PER_STEP: u64 = 2_097_152;

fn steps(m: &ModelConfig) -> (f64, u64) {
    let map = m.sharing_map().unwrap();
    let r = iso_flop(m, &map, 2048, BUDGET, TOKENS_PER_STEP);
    assert_eq!(r.tokens, r.steps * TOKENS_PER_STEP);
    (r.flops_per_token, r.steps)
}

fn assert_steps(name: &str, m: &ModelConfig, released: u64, fwd_millions: f64) {
    let (fpt, s) = steps(m);
    assert!(s.abs_diff(released) <= 3, "{name}: {s} steps, released {released}");
    assert!(
        (fpt / 1e6 - fwd_millions).abs() < 0.06,
        "{name}: {} MFLOPs/token, spec {fwd_millions}",
        fpt / 1e6
    );
}

#[test]
fn inv24_step_counts() {
    let mut kv_share = middle_cycle(&D360, 32, 3, expert());
    kv_share.recursion.as_mut().unwrap().kv_mode = KvMode::Share;
    assert_steps("vanilla 360M", &vanilla(&D360), 9_438, 833.6);
    assert_steps("recursive N_r=2", &middle_cycle(&D360, 32, 2, None), 9_438, 833.6);
    assert_steps("recursive N_r=3", &middle_cycle(&D360, 32, 3, None), 9_438, 833.6);
    assert_steps("recursive N_r=4 (34L)", &middle_cycle(&D360, 34, 4, None), 8_883, 885.7);
    assert_steps("MoR-E N_r=2", &middle_cycle(&D360, 32, 2, expert()), 12_619, 623.5);
    assert_steps("MoR-E N_r=3", &middle_cycle(&D360, 32, 3, expert()), 14_161, 555.6);
    assert_steps("MoR-E N_r=4", &middle_cycle(&D360, 34, 4, expert()), 14_216, 553.5);
    assert_steps("MoR-T N_r=3", &middle_cycle(&D360, 32, 3, token()), 14_161, 555.6);
    assert_steps("MoR-E N_r=3 + KV share", &kv_share, 14_672, 536.3);
    assert_steps("135M MoR-E N_r=3", &middle_cycle(&D135, 32, 3, expert()), 36_326, 216.6);
}

#[test]
fn flop_formula_terms() {
    // layer(c) and layer_shared(c) of MOR_SPEC 7.3 at d=960, d_inter=2560, L=2048.
    assert_eq!(layer_flops(960.0, 2560.0, 2048.0, 1.0), 26_050_560.0);
    assert_eq!(layer_flops(960.0, 2560.0, 2048.0, 0.5), 11_059_200.0 + 983_040.0);
    assert_eq!(
        layer_shared_flops(960.0, 2560.0, 2048.0, 0.5),
        2.0 * (2.0 * 921_600.0 + 7_372_800.0) * 0.5 + 1_966_080.0
    );
    // Vanilla: 32 · layer(1) exactly.
    let m = vanilla(&D360);
    assert_eq!(m.forward_flops_per_token(2048).unwrap(), 32.0 * 26_050_560.0);
    // Training FLOPs: 3 × (forward + LM head 2·d·V).
    let map = m.sharing_map().unwrap();
    let fwd = forward_flops_per_token(&m, &map, 2048);
    assert_eq!(train_flops_per_token(&m, &map, 2048), 3.0 * (fwd + 2.0 * 960.0 * 49_152.0));
}

#[test]
fn capacities_drive_flops() {
    // Explicit capacities of 1.0 everywhere make MoR cost the same as the recursive model.
    let dense = middle_cycle(&D360, 32, 3, Some("kind = \"expert\"\ncapacities = [1.0, 1.0, 1.0]"));
    assert_eq!(
        dense.forward_flops_per_token(2048).unwrap(),
        middle_cycle(&D360, 32, 3, None).forward_flops_per_token(2048).unwrap()
    );
    // Cycle (no unique layers) MoR: every position belongs to a recursion step.
    let mut cyc = vanilla(&D360);
    cyc.num_layers = 33;
    cyc.recursion = Some(recursion(Sharing::Cycle, 3));
    cyc.router = Some(router("kind = \"expert\""));
    cyc.validate().unwrap();
    let expected = 11.0
        * (layer_flops(960.0, 2560.0, 2048.0, 1.0)
            + layer_flops(960.0, 2560.0, 2048.0, 2.0 / 3.0)
            + layer_flops(960.0, 2560.0, 2048.0, 1.0 / 3.0));
    assert!((cyc.forward_flops_per_token(2048).unwrap() - expected).abs() < 1e-3);
}
