//! MOR_SPEC 11 invariants 4 (sharing map), 5 (unrolled layer counts) and 6 (capacities).

use mor_config::presets::padded_layers;
use mor_config::*;
use std::collections::{BTreeMap, BTreeSet};

/// Pool index (0-based, shared pool only) of MOR_SPEC 2.1, written independently of the map.
fn spec_pool_index(s: Sharing, l: usize, layers: usize, n: usize) -> Option<usize> {
    match s {
        Sharing::Cycle => Some(l % (layers / n)),
        Sharing::Sequence => Some(l / n),
        Sharing::MiddleCycle | Sharing::MiddleSequence if l == 0 || l == layers - 1 => None,
        Sharing::MiddleCycle => Some((l - 1) % ((layers - 2) / n)),
        Sharing::MiddleSequence => Some((l - 1) / n),
    }
}

/// Groups of tied positions, code formula of MOR_SPEC 2.1.
fn spec_groups(s: Sharing, base_depth: usize, n: usize) -> Vec<BTreeSet<usize>> {
    (0..base_depth)
        .map(|i| {
            (0..n)
                .map(|j| match s {
                    Sharing::Cycle => i + j * base_depth,
                    Sharing::Sequence => i * n + j,
                    Sharing::MiddleCycle => 1 + i + j * base_depth,
                    Sharing::MiddleSequence => 1 + i * n + j,
                })
                .collect()
        })
        .collect()
}

const ALL: [Sharing; 4] = [Sharing::Cycle, Sharing::Sequence, Sharing::MiddleCycle, Sharing::MiddleSequence];

#[test]
fn inv4_examples_of_the_spec_table() {
    let map = |s, l, n| SharingMap::new(s, l, n).unwrap().param_set;
    assert_eq!(map(Sharing::Cycle, 9, 3), vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    assert_eq!(map(Sharing::Sequence, 9, 3), vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
    // U0,(a,b)(a,b)(a,b),U7 with a=1, b=2, U7=3.
    assert_eq!(map(Sharing::MiddleCycle, 8, 3), vec![0, 1, 2, 1, 2, 1, 2, 3]);
    // U0,(a,a,a)(b,b,b),U7.
    assert_eq!(map(Sharing::MiddleSequence, 8, 3), vec![0, 1, 1, 1, 2, 2, 2, 3]);
}

#[test]
fn inv4_every_strategy_and_shape() {
    for s in ALL {
        for n in 1..=5 {
            for bd in 1..=12 {
                let layers = n * bd + if s.is_middle() { 2 } else { 0 };
                let m = SharingMap::new(s, layers, n).unwrap();
                assert_eq!(m.base_depth, bd);
                assert_eq!(m.param_set.len(), layers);
                let offset = usize::from(s.is_middle());
                for l in 0..layers {
                    let expect = match spec_pool_index(s, l, layers, n) {
                        Some(p) => p + offset,
                        None if l == 0 => 0,
                        None => bd + 1,
                    };
                    assert_eq!(m.param_set[l], expect, "{s:?} L={layers} N_r={n} l={l}");
                }
                let distinct: BTreeSet<_> = m.param_set.iter().collect();
                let want = bd + if s.is_middle() { 2 } else { 0 };
                assert_eq!(distinct.len(), want, "{s:?} L={layers} N_r={n}");
                assert_eq!(m.num_param_sets(), want);
                // Positions tied together = the code's groups.
                let mut groups: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
                for (l, &p) in m.param_set.iter().enumerate() {
                    groups.entry(p).or_default().insert(l);
                }
                // Shared pool sets only (the unique first/last sets of Middle variants excluded).
                let mut got: Vec<BTreeSet<usize>> = groups
                    .into_iter()
                    .filter(|(p, _)| (offset..offset + bd).contains(p))
                    .map(|(_, g)| g)
                    .collect();
                got.sort();
                let mut want_groups = spec_groups(s, bd, n);
                want_groups.sort();
                assert_eq!(got, want_groups, "{s:?} L={layers} N_r={n}");
            }
        }
    }
}

#[test]
fn inv4_recursion_blocks_of_middle_cycle() {
    let m = SharingMap::new(Sharing::MiddleCycle, 32, 3).unwrap();
    assert_eq!(m.step_positions(0), 1..11);
    assert_eq!(m.step_positions(2), 21..31);
    assert_eq!(m.suffix_positions(), 31..32);
    for r in 0..3 {
        let sets: Vec<usize> = m.step_positions(r).map(|l| m.param_set[l]).collect();
        assert_eq!(sets, (1..11).collect::<Vec<_>>(), "step {r} uses the whole pool in order");
    }
}

#[test]
fn inv4_indivisible_depth_is_an_error() {
    let err = SharingMap::new(Sharing::MiddleCycle, 32, 4).unwrap_err().to_string();
    assert!(err.starts_with("model.num_layers"), "{err}");
    assert!(SharingMap::new(Sharing::Cycle, 32, 3).is_err());
}

#[test]
fn inv5_unrolled_layer_counts() {
    // Middle-Cycle 360M: 32, 32, 34 for N_r = 2, 3, 4.
    assert_eq!([2, 3, 4].map(|n| padded_layers(32, Sharing::MiddleCycle, n)), [32, 32, 34]);
    assert_eq!(padded_layers(30, Sharing::MiddleCycle, 3), 32); // 135M
    assert_eq!(padded_layers(24, Sharing::MiddleCycle, 3), 26); // 1.7B
    assert_eq!(padded_layers(24, Sharing::MiddleCycle, 2), 24);
    assert_eq!(padded_layers(26, Sharing::MiddleCycle, 3), 26); // 730M
    assert_eq!(padded_layers(32, Sharing::Cycle, 3), 33);
    assert_eq!(padded_layers(8, Sharing::MiddleCycle, 4), 10); // tiny
                                                               // The presets carry them, and 1 + N_r·base_depth + 1 holds.
    for (name, layers, n) in [
        ("360m-mor-ec2", 32, 2),
        ("360m-mor-ec3", 32, 3),
        ("360m-mor-ec4", 34, 4),
        ("360m-rec4-mcycle", 34, 4),
    ] {
        let m = load(name).unwrap().model;
        assert_eq!(m.num_layers, layers, "{name}");
        let map = m.sharing_map().unwrap();
        assert_eq!(1 + n * map.base_depth + 1, layers, "{name}");
        assert_eq!(map.num_recursions, n);
    }
    assert_eq!(load("135m-mor-ec3").unwrap().model.num_layers, 32);
    assert_eq!(load("1.7b-mor-ec3").unwrap().model.num_layers, 26);
    assert_eq!(load("1.7b-mor-ec2").unwrap().model.num_layers, 24);
}

#[test]
fn inv6_capacity_tokens() {
    let expert: RouterConfig = toml::from_str("kind = \"expert\"").unwrap();
    let k = |n: usize| (0..n).map(|r| capacity_tokens(expert.capacity(r, n), 2048)).collect::<Vec<_>>();
    assert_eq!(k(2), [2048, 1024]);
    assert_eq!(k(3), [2048, 1365, 682]);
    assert_eq!(k(4), [2048, 1536, 1024, 512]);
    // Per sequence of 24 tokens (verified run in the spec): 24/16/8; and never below 1.
    assert_eq!((0..3).map(|r| capacity_tokens(expert.capacity(r, 3), 24)).collect::<Vec<_>>(), [24, 16, 8]);
    assert_eq!(capacity_tokens(1.0 / 3.0, 1), 1);
}
