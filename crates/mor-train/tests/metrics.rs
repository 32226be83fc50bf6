//! JSONL metrics: one line per record, reader, truncation on resume.

use mor_train::metrics::{read_metrics, series, truncate_metrics, MetricsWriter, Record};
use serde_json::{json, Map};
use std::fs;

#[test]
fn writes_one_flushed_line_per_record() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("logs/metrics.jsonl");
    let mut w = MetricsWriter::create(&path).unwrap();
    let mut extra = Map::new();
    extra.insert("aux_loss".into(), json!(0.69));
    extra.insert("step".into(), json!(999)); // reserved: ignored
    w.log_step(1, 10.5, 0.0, 12345.0, 3.25, extra).unwrap();
    w.log(&Record::new(1).with("val_loss", 10.25)).unwrap();
    // Visible to a reader before the writer is dropped (flushed per line).
    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first, json!({ "step": 1, "loss": 10.5, "lr": 0.0, "tokens_per_s": 12345.0, "grad_norm": 3.25, "aux_loss": 0.69 }));
    let recs = read_metrics(&path).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].get_f64("loss"), Some(10.5));
    assert_eq!(recs[1].get_f64("val_loss"), Some(10.25));
    assert_eq!(recs[1].get_f64("loss"), None);
    // Non-finite values become null and are skipped by `series`.
    w.log(&Record::train(2, f64::NAN, 1e-3, 1.0, f64::INFINITY)).unwrap();
    let recs = read_metrics(&path).unwrap();
    assert_eq!(series(&recs, "loss"), vec![(1.0, 10.5)]);
}

#[test]
fn resume_truncates_steps_after_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("metrics.jsonl");
    let mut w = MetricsWriter::create(&path).unwrap();
    for s in 1..=10 {
        w.log(&Record::train(s, 10.0 - s as f64 * 0.1, 1e-3, 100.0, 1.0)).unwrap();
        if s % 5 == 0 {
            w.log(&Record::new(s).with("val_loss", 9.0)).unwrap();
        }
    }
    drop(w);
    // Simulate a crash mid-line.
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str("{\"step\": 11, \"loss\": 8.");
    fs::write(&path, &text).unwrap();
    assert_eq!(read_metrics(&path).unwrap().len(), 12, "torn line skipped by the reader");

    // Checkpoint was at step 7: records 8..=10 (plus the val record at 10 and the torn line) go.
    let mut w = MetricsWriter::resume(&path, 7).unwrap();
    let recs = read_metrics(&path).unwrap();
    let steps: Vec<u64> = recs.iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 5, 6, 7]);
    w.log(&Record::train(8, 1.0, 1e-3, 100.0, 1.0)).unwrap();
    let steps: Vec<u64> = read_metrics(&path).unwrap().iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 5, 6, 7, 8]);
    assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 9);

    // Nothing beyond: no change; missing file: nothing to do.
    assert_eq!(truncate_metrics(&path, 100).unwrap(), 0);
    assert_eq!(truncate_metrics(&tmp.path().join("absent.jsonl"), 3).unwrap(), 0);
    assert!(!tmp.path().join("absent.jsonl").exists());
}
