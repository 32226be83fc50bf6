//! Checkpoints: bit-exact round trip, atomic replace, validation errors naming tensor and file.

mod common;
use common::*;
use mor_engine::ParamGroup::{AuxRouter, Main};
use mor_engine::{Backend, ParamStore};
use mor_train::checkpoint::{
    checkpoint_dir, latest_checkpoint, load_checkpoint, load_model_weights, read_safetensors_f32, read_state,
    save_checkpoint, save_model_weights, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,
};
use mor_train::optim::{AdamW, AdamWConfig};
use serde_json::json;
use std::fs;
use std::path::Path;

/// A small model: decayed matrices, a norm vector, an aux-router tensor.
fn model(b: &B, seed: u32) -> ParamStore<B> {
    store(
        b,
        &[
            ("model.embed_tokens.weight", &[5, 4], true, Main, &pseudo_random(20, seed)),
            ("model.layers.0.self_attn.q_proj.weight", &[4, 4], true, Main, &pseudo_random(16, seed + 1)),
            ("model.norm.weight", &[4], false, Main, &pseudo_random(4, seed + 2)),
            ("model.mor.aux_router.weight", &[1, 4], true, AuxRouter, &pseudo_random(4, seed + 3)),
        ],
    )
}

fn trained(b: &B) -> (ParamStore<B>, AdamW<B>, AdamW<B>) {
    let mut ps = model(b, 1);
    let mut main = AdamW::new(b, &ps, Main, AdamWConfig::default());
    let mut aux = AdamW::new(b, &ps, AuxRouter, AdamWConfig::default().with_lr_mult(10.0));
    for t in 0..3u32 {
        for i in 0..ps.len() {
            let n = ps.info[i].numel();
            b.write_f32(&mut ps.grads[i], &pseudo_random(n, 100 + 10 * t + i as u32));
        }
        main.step(b, &mut ps, 1e-3);
        aux.step(b, &mut ps, 1e-3);
    }
    (ps, main, aux)
}

fn bits(b: &B, ps: &ParamStore<B>) -> Vec<Vec<u32>> {
    ps.values.iter().map(|v| b.to_f32(v).iter().map(|x| x.to_bits()).collect()).collect()
}

fn opt_bits(b: &B, ps: &ParamStore<B>, o: &AdamW<B>) -> Vec<(String, Vec<u32>)> {
    o.state_tensors(b, ps).into_iter().map(|t| (t.name, t.data.iter().map(|x| x.to_bits()).collect())).collect()
}

fn leftovers(parent: &Path) -> Vec<String> {
    fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn round_trip_is_bit_exact() {
    let b = backend();
    let run = tempfile::tempdir().unwrap();
    let dir = checkpoint_dir(run.path());
    let (ps, main, aux) = trained(&b);
    let state = json!({ "step": 3, "rng": [1u64, 2, 3], "data": { "shard": 0, "offset": 12345 }, "config": { "lr": 3e-3 } });
    save_checkpoint(&dir, &b, &ps, &[&main, &aux], &state).unwrap();
    for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert_eq!(latest_checkpoint(run.path()), Some(dir.clone()));
    assert!(leftovers(run.path()).is_empty(), "{:?}", leftovers(run.path()));

    // Layout: model tensors by name, optimizer by <name>.exp_avg / .exp_avg_sq, steps in metadata.
    let (tensors, meta) = read_safetensors_f32(&dir.join(MODEL_FILE)).unwrap();
    assert_eq!(tensors.len(), 4);
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    let q = tensors.iter().find(|t| t.name == "model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.shape, vec![4, 4]);
    let (otensors, ometa) = read_safetensors_f32(&dir.join(OPTIMIZER_FILE)).unwrap();
    assert_eq!(otensors.len(), 8);
    assert!(otensors.iter().any(|t| t.name == "model.norm.weight.exp_avg_sq"));
    assert!(otensors.iter().any(|t| t.name == "model.mor.aux_router.weight.exp_avg"));
    assert_eq!(ometa.get("step.main").map(String::as_str), Some("3"));
    assert_eq!(ometa.get("step.aux_router").map(String::as_str), Some("3"));

    let mut ps2 = model(&b, 77);
    let mut main2 = AdamW::new(&b, &ps2, Main, AdamWConfig::default());
    let mut aux2 = AdamW::new(&b, &ps2, AuxRouter, AdamWConfig::default().with_lr_mult(10.0));
    assert_ne!(bits(&b, &ps2), bits(&b, &ps));
    let got = load_checkpoint(&dir, &b, &mut ps2, &mut [&mut main2, &mut aux2]).unwrap();
    assert_eq!(got, state);
    assert_eq!(read_state(&dir).unwrap(), state);
    assert_eq!(bits(&b, &ps2), bits(&b, &ps));
    assert_eq!(opt_bits(&b, &ps2, &main2), opt_bits(&b, &ps, &main));
    assert_eq!(opt_bits(&b, &ps2, &aux2), opt_bits(&b, &ps, &aux));
    assert_eq!((main2.steps_taken(), aux2.steps_taken()), (3, 3));
}

struct FailingState;
impl serde::Serialize for FailingState {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("simulated failure while serialising the state"))
    }
}

#[test]
fn failed_write_keeps_previous_checkpoint() {
    let b = backend();
    let run = tempfile::tempdir().unwrap();
    let dir = checkpoint_dir(run.path());
    let (mut ps, main, aux) = trained(&b);
    save_checkpoint(&dir, &b, &ps, &[&main, &aux], &json!({ "step": 1 })).unwrap();
    let model_before = fs::read(dir.join(MODEL_FILE)).unwrap();
    let opt_before = fs::read(dir.join(OPTIMIZER_FILE)).unwrap();

    // Change the weights, then fail while writing (the state is written after both tensor files).
    b.write_f32(&mut ps.values[0], &[9.0; 20]);
    let err = save_checkpoint(&dir, &b, &ps, &[&main, &aux], &FailingState).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("simulated failure") && msg.contains("previous checkpoint"), "{msg}");
    assert_eq!(read_state(&dir).unwrap(), json!({ "step": 1 }));
    assert_eq!(fs::read(dir.join(MODEL_FILE)).unwrap(), model_before);
    assert_eq!(fs::read(dir.join(OPTIMIZER_FILE)).unwrap(), opt_before);
    assert!(leftovers(run.path()).is_empty(), "temp dir not cleaned: {:?}", leftovers(run.path()));

    // A successful save then replaces it completely.
    save_checkpoint(&dir, &b, &ps, &[&main, &aux], &json!({ "step": 2 })).unwrap();
    assert_eq!(read_state(&dir).unwrap(), json!({ "step": 2 }));
    assert_ne!(fs::read(dir.join(MODEL_FILE)).unwrap(), model_before);
    assert!(leftovers(run.path()).is_empty(), "{:?}", leftovers(run.path()));
}

#[test]
fn stale_temp_dirs_are_removed_and_backup_is_found() {
    let b = backend();
    let run = tempfile::tempdir().unwrap();
    let dir = checkpoint_dir(run.path());
    let (ps, main, aux) = trained(&b);
    assert_eq!(latest_checkpoint(run.path()), None);
    // A crashed earlier save left a half-written temp dir.
    let stale = run.path().join(".checkpoint.tmp-1-2");
    fs::create_dir(&stale).unwrap();
    fs::write(stale.join(MODEL_FILE), b"half").unwrap();
    save_checkpoint(&dir, &b, &ps, &[&main, &aux], &json!({ "step": 5 })).unwrap();
    assert!(!stale.exists());

    // A crash between the two renames of the non-atomic fallback leaves only the backup.
    let backup = run.path().join(".checkpoint.old");
    fs::rename(&dir, &backup).unwrap();
    assert_eq!(latest_checkpoint(run.path()), Some(backup.clone()));
    assert_eq!(read_state(&backup).unwrap(), json!({ "step": 5 }));
}

#[test]
fn refuses_to_replace_a_non_checkpoint_directory() {
    let b = backend();
    let run = tempfile::tempdir().unwrap();
    let (ps, main, _) = trained(&b);
    fs::write(run.path().join("precious.txt"), b"data").unwrap();
    let err = save_checkpoint(run.path(), &b, &ps, &[&main], &json!({})).unwrap_err().to_string();
    assert!(err.contains("not a checkpoint"), "{err}");
    assert!(run.path().join("precious.txt").exists());
}

fn saved(b: &B) -> (tempfile::TempDir, std::path::PathBuf) {
    let run = tempfile::tempdir().unwrap();
    let dir = checkpoint_dir(run.path());
    let (ps, main, aux) = trained(b);
    save_checkpoint(&dir, b, &ps, &[&main, &aux], &json!({ "step": 3 })).unwrap();
    (run, dir)
}

fn try_load(b: &B, dir: &Path, ps: &mut ParamStore<B>) -> String {
    let mut main = AdamW::new(b, ps, Main, AdamWConfig::default());
    let mut aux = AdamW::new(b, ps, AuxRouter, AdamWConfig::default());
    let before = bits(b, ps);
    let err = load_checkpoint(dir, b, ps, &mut [&mut main, &mut aux]).unwrap_err();
    assert_eq!(bits(b, ps), before, "a failed load must not modify parameters");
    assert_eq!((main.steps_taken(), aux.steps_taken()), (0, 0));
    format!("{err:#}")
}

#[test]
fn truncated_or_corrupt_safetensors_is_an_error_naming_the_file() {
    let b = backend();
    let (_run, dir) = saved(&b);
    let path = dir.join(MODEL_FILE);
    let full = fs::read(&path).unwrap();
    fs::write(&path, &full[..full.len() - 7]).unwrap();
    let err = try_load(&b, &dir, &mut model(&b, 9));
    assert!(err.contains("model.safetensors") && err.contains("corrupt or truncated"), "{err}");

    fs::write(&path, b"\xff\xff\xff\xff garbage that is not a safetensors file").unwrap();
    let err = try_load(&b, &dir, &mut model(&b, 9));
    assert!(err.contains("model.safetensors") && err.contains("corrupt or truncated"), "{err}");

    // Optimizer file corrupted in the header (JSON broken).
    let opath = dir.join(OPTIMIZER_FILE);
    let mut obytes = fs::read(&opath).unwrap();
    obytes[8] = b'!'; // the opening brace of the JSON header
    fs::write(&opath, &obytes).unwrap();
    fs::write(&path, &full).unwrap();
    let err = try_load(&b, &dir, &mut model(&b, 9));
    assert!(err.contains("optimizer.safetensors") && err.contains("corrupt or truncated"), "{err}");
}

#[test]
fn missing_files_are_named() {
    let b = backend();
    for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
        let (_run, dir) = saved(&b);
        fs::remove_file(dir.join(f)).unwrap();
        let err = try_load(&b, &dir, &mut model(&b, 9));
        assert!(err.contains(f) && err.contains("missing"), "{f}: {err}");
    }
    let err = try_load(&b, Path::new("/nonexistent/checkpoint"), &mut model(&b, 9));
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn missing_extra_or_misshaped_tensor_is_named() {
    let b = backend();
    let (_run, dir) = saved(&b);

    // The store has a tensor the file lacks.
    let mut ps = model(&b, 9);
    ps.add(
        &b,
        mor_engine::ParamInfo { name: "lm_head.weight".into(), shape: vec![5, 4], decay: true, group: Main },
        &[0.0; 20],
    );
    let err = try_load(&b, &dir, &mut ps);
    assert!(err.contains("tensor lm_head.weight is missing") && err.contains("model.safetensors"), "{err}");

    // The file has a tensor the store lacks.
    let mut ps = store(
        &b,
        &[
            ("model.embed_tokens.weight", &[5, 4], true, Main, &[0.0; 20]),
            ("model.layers.0.self_attn.q_proj.weight", &[4, 4], true, Main, &[0.0; 16]),
            ("model.mor.aux_router.weight", &[1, 4], true, AuxRouter, &[0.0; 4]),
        ],
    );
    let err = try_load(&b, &dir, &mut ps);
    assert!(err.contains("unexpected tensor model.norm.weight") && err.contains("model.safetensors"), "{err}");

    // Same name, other shape.
    let mut ps = store(
        &b,
        &[
            ("model.embed_tokens.weight", &[4, 5], true, Main, &[0.0; 20]),
            ("model.layers.0.self_attn.q_proj.weight", &[4, 4], true, Main, &[0.0; 16]),
            ("model.norm.weight", &[4], false, Main, &[0.0; 4]),
            ("model.mor.aux_router.weight", &[1, 4], true, AuxRouter, &[0.0; 4]),
        ],
    );
    let err = try_load(&b, &dir, &mut ps);
    assert!(err.contains("model.embed_tokens.weight") && err.contains("shape [5, 4]") && err.contains("[4, 5]"), "{err}");
}

#[test]
fn optimizer_state_mismatches_are_named() {
    let b = backend();
    let run = tempfile::tempdir().unwrap();
    let dir = checkpoint_dir(run.path());
    let (ps, main, _aux) = trained(&b);
    // Saved without the aux optimizer.
    save_checkpoint(&dir, &b, &ps, &[&main], &json!({})).unwrap();
    let err = try_load(&b, &dir, &mut model(&b, 9));
    assert!(err.contains("optimizer.safetensors") && err.contains("step.aux_router"), "{err}");

    // Saved with the aux optimizer, loaded without it: the extra state is reported.
    let (ps, main, aux) = trained(&b);
    save_checkpoint(&dir, &b, &ps, &[&main, &aux], &json!({})).unwrap();
    let mut ps2 = model(&b, 9);
    let mut main2 = AdamW::new(&b, &ps2, Main, AdamWConfig::default());
    let err = format!("{:#}", load_checkpoint(&dir, &b, &mut ps2, &mut [&mut main2]).unwrap_err());
    assert!(err.contains("step.aux_router") && err.contains("optimizer.safetensors"), "{err}");
}

#[test]
fn model_weights_only_round_trip() {
    let b = backend();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("export/model.safetensors");
    let (ps, _, _) = trained(&b);
    save_model_weights(&path, &b, &ps).unwrap();
    let mut ps2 = model(&b, 42);
    load_model_weights(&path, &b, &mut ps2).unwrap();
    assert_eq!(bits(&b, &ps2), bits(&b, &ps));
}
