//! The non-atomic replace path (two renames via `.<name>.old`), used where the filesystem has no
//! `RENAME_EXCHANGE`. Own test binary: the switch is process-global.

mod common;
use common::*;
use mor_engine::ParamGroup::Main;
use mor_train::checkpoint::{checkpoint_dir, force_rename_fallback, load_checkpoint, read_state, save_checkpoint};
use mor_train::optim::{AdamW, AdamWConfig};
use serde_json::json;

#[test]
fn fallback_replace_keeps_and_then_replaces() {
    force_rename_fallback(true);
    let b = backend();
    let run = tempfile::tempdir().unwrap();
    let dir = checkpoint_dir(run.path());
    let mut ps = store(&b, &[("w", &[3], true, Main, &[1.0, 2.0, 3.0])]);
    let opt = AdamW::new(&b, &ps, Main, AdamWConfig::default());
    save_checkpoint(&dir, &b, &ps, &[&opt], &json!({ "step": 1 })).unwrap();
    set_grad(&b, &mut ps, "w", &[0.0; 3]);
    b_write(&b, &mut ps, &[4.0, 5.0, 6.0]);
    save_checkpoint(&dir, &b, &ps, &[&opt], &json!({ "step": 2 })).unwrap();
    assert_eq!(read_state(&dir).unwrap(), json!({ "step": 2 }));
    let names: Vec<String> =
        std::fs::read_dir(run.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["checkpoint".to_string()], "backup or temp left behind");
    let mut ps2 = store(&b, &[("w", &[3], true, Main, &[0.0; 3])]);
    let mut opt2 = AdamW::new(&b, &ps2, Main, AdamWConfig::default());
    load_checkpoint(&dir, &b, &mut ps2, &mut [&mut opt2]).unwrap();
    assert_eq!(value(&b, &ps2, "w"), vec![4.0, 5.0, 6.0]);
}

fn b_write(b: &B, ps: &mut mor_engine::ParamStore<B>, v: &[f32]) {
    use mor_engine::Backend;
    b.write_f32(&mut ps.values[0], v);
}
