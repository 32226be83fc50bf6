//! The preset files: reproducible from the generator, embedded in the library, valid, and
//! loadable by name or path.

use mor_config::presets::*;
use mor_config::*;
use std::path::PathBuf;

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

const REGEN: &str = "run `cargo run -p mor-config --example gen_presets` and commit configs/";

#[test]
fn committed_files_equal_generator_output() {
    let files = generate_preset_files();
    assert_eq!(files.len(), 110);
    for (name, text) in &files {
        let path = configs_dir().join(name);
        let on_disk =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; {REGEN}", path.display()));
        assert_eq!(&on_disk, text, "{} is stale; {REGEN}", path.display());
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(configs_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    on_disk.sort();
    let mut generated: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    generated.sort();
    assert_eq!(on_disk, generated, "configs/ holds files the generator does not produce");
}

#[test]
fn embedded_presets_equal_generator_output() {
    let mut generated = generate_preset_files();
    generated.sort_by(|a, b| a.0.strip_suffix(".toml").cmp(&b.0.strip_suffix(".toml")));
    let names = preset_names();
    assert_eq!(names.len(), 110);
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
    for ((file, text), name) in generated.iter().zip(&names) {
        assert_eq!(file.strip_suffix(".toml").unwrap(), *name);
        assert_eq!(preset_toml(name).unwrap(), text, "embedded {name} is stale");
    }
}

#[test]
fn names_cover_every_size_and_arch() {
    let names = preset_names();
    for size in ["135m", "360m", "730m", "1.7b", "tiny"] {
        let mut archs = vec!["vanilla".to_string()];
        for n in 2..=4 {
            for s in ["cycle", "seq", "mcycle", "mseq"] {
                archs.push(format!("rec{n}-{s}"));
            }
            archs.push(format!("mor-ec{n}"));
            archs.push(format!("mor-ec{n}-share"));
            archs.push(format!("mor-tc{n}"));
        }
        assert_eq!(archs.len(), 22);
        for a in archs {
            let name = format!("{size}-{a}");
            assert!(names.contains(&name.as_str()), "missing preset {name}");
        }
    }
}

#[test]
fn every_preset_loads_and_round_trips() {
    for (name, cfg) in generate_presets() {
        let loaded = load(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(loaded, cfg, "{name}");
        assert_eq!(loaded.name, name);
        // The full serialisation parses back to the same config too.
        assert_eq!(RunConfig::from_toml_str(&loaded.to_toml(), &name).unwrap(), loaded, "{name}");
    }
}

#[test]
fn preset_contents_follow_the_paper() {
    let c = load("360m-vanilla").unwrap();
    assert_eq!(
        (c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.num_kv_heads),
        (32, 960, 15, 5)
    );
    assert!(c.model.recursion.is_none() && c.model.router.is_none() && c.model.tie_embeddings);
    let t = &c.train;
    assert_eq!((t.seq_len, t.micro_batch, t.grad_accum, t.warmup_steps, t.steps), (2048, 16, 64, 57, 9_438));
    assert_eq!(
        (t.lr, t.schedule, t.decay_fraction, t.weight_decay, t.beta1, t.beta2, t.grad_clip),
        (3e-3, Schedule::Wsd, 0.2, 0.1, 0.9, 0.95, 1.0)
    );
    assert_eq!(load("360m-rec3-mcycle").unwrap().train.warmup_steps, 57);

    let c = load("360m-mor-ec3").unwrap();
    assert_eq!(c.train.warmup_steps, 86);
    assert!(c.train.steps.abs_diff(14_161) <= 3);
    let r = c.model.router.as_ref().unwrap();
    assert_eq!(
        (r.kind, r.arch, r.activation(), r.alpha(), r.sampling, r.aux_coeff),
        (RouterKind::Expert, RouterArch::Linear, RouterActivation::Sigmoid, 0.1, Sampling::AuxLoss, 0.001)
    );
    let rec = c.model.recursion.as_ref().unwrap();
    assert_eq!(
        (rec.sharing, rec.num_recursions, rec.kv_mode, rec.untie_attention),
        (Sharing::MiddleCycle, 3, KvMode::RecursionWise, false)
    );

    assert_eq!(load("360m-mor-ec3-share").unwrap().model.kv_mode(), KvMode::Share);
    let c = load("360m-mor-tc3").unwrap();
    let r = c.model.router.as_ref().unwrap();
    assert_eq!(
        (r.kind, r.activation(), r.alpha(), r.balancing, r.balance_coeff, r.z_coeff()),
        (RouterKind::Token, RouterActivation::Softmax, 1.0, Balancing::Loss, 0.1, 1e-5)
    );
    assert_eq!(c.train.warmup_steps, 86);

    let seq = load("360m-rec3-seq").unwrap().model;
    assert_eq!((seq.num_layers, seq.recursion.unwrap().sharing), (33, Sharing::Sequence));
}

#[test]
fn tiny_presets_are_cpu_sized() {
    for name in preset_names().into_iter().filter(|n| n.starts_with("tiny-")) {
        let c = load(name).unwrap();
        let m = &c.model;
        assert_eq!(
            (
                m.vocab_size,
                m.hidden_size,
                m.num_heads,
                m.num_kv_heads,
                m.head_dim,
                m.intermediate_size,
                m.max_seq_len
            ),
            (4096, 128, 4, 2, 32, 384, 256),
            "{name}"
        );
        let t = &c.train;
        assert_eq!(
            (t.seq_len, t.micro_batch, t.grad_accum, t.steps, t.warmup_steps, t.lr),
            (128, 8, 1, 300, 30, 3e-3),
            "{name}"
        );
        assert_eq!(c.data.train.as_deref(), Some("builtin"), "{name}");
    }
    let layers = |n: &str| load(n).unwrap().model.num_layers;
    assert_eq!(
        [layers("tiny-vanilla"), layers("tiny-mor-ec2"), layers("tiny-mor-ec3"), layers("tiny-mor-ec4")],
        [8, 8, 8, 10]
    );
    assert_eq!([layers("tiny-rec2-cycle"), layers("tiny-rec3-cycle"), layers("tiny-rec4-seq")], [8, 9, 8]);
}

#[test]
fn preset_steps_are_the_iso_flop_counts() {
    for (name, cfg) in generate_presets().into_iter().filter(|(n, _)| !n.starts_with("tiny-")) {
        let m = &cfg.model;
        let fpt = m.forward_flops_per_token(2048).unwrap();
        let tokens_per_step = (cfg.train.seq_len * cfg.train.micro_batch * cfg.train.grad_accum) as u64;
        assert_eq!(tokens_per_step, 2_097_152);
        assert_eq!(
            cfg.train.steps as u64,
            accounting::iso_flop_steps(fpt, 16.5e18, tokens_per_step),
            "{name}"
        );
    }
    let steps = |n: &str| load(n).unwrap().train.steps as i64;
    for (name, released) in [
        ("360m-vanilla", 9_438),
        ("360m-rec2-mcycle", 9_438),
        ("360m-rec4-mcycle", 8_883),
        ("360m-mor-ec2", 12_619),
        ("360m-mor-ec4", 14_216),
        ("360m-mor-tc3", 14_161),
        ("360m-mor-ec3-share", 14_672),
        ("135m-mor-ec3", 36_326),
    ] {
        assert!((steps(name) - released).abs() <= 3, "{name}: {}", steps(name));
    }
}

#[test]
fn load_by_path() {
    let path = configs_dir().join("tiny-mor-ec3.toml");
    let cfg = load(path.to_str().unwrap()).unwrap();
    assert_eq!(cfg, load("tiny-mor-ec3").unwrap());
}

#[test]
fn unknown_preset_suggests_close_matches() {
    let err = load("360m-mor-e3").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::UnknownPreset { .. }), "{msg}");
    assert!(msg.contains("360m-mor-ec3"), "{msg}");
    assert!(msg.contains("mor presets"), "{msg}");
    let msg = load("no-such-thing-at-all").unwrap_err().to_string();
    assert!(msg.contains("unknown preset `no-such-thing-at-all`"), "{msg}");
    let msg = load("configs/missing.toml").unwrap_err().to_string();
    assert!(msg.contains("cannot read config configs/missing.toml"), "{msg}");
}
