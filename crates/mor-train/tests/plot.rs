//! Loss-curve PNG and progress bar smoke tests.

use mor_train::metrics::{MetricsWriter, Record};
use mor_train::plot::{plot_loss_curve, plot_metrics_file, PlotOptions};
use mor_train::progress::{format_status, Progress};
use std::fs;

fn is_png(bytes: &[u8]) -> bool {
    bytes.len() > 8 && bytes[..8] == [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a]
}

type Series = Vec<(f64, f64)>;

fn fake_run() -> (Series, Series) {
    let train: Vec<(f64, f64)> = (1..=500)
        .map(|s| {
            let s = s as f64;
            (s, 3.0 + 7.8 * (-s / 60.0).exp() + 0.15 * (s * 1.7).sin())
        })
        .collect();
    let val: Vec<(f64, f64)> = (1..=5).map(|k| (k as f64 * 100.0, 3.05 + 7.8 * (-(k as f64) * 100.0 / 60.0).exp())).collect();
    (train, val)
}

#[test]
fn writes_a_nonempty_png() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, val) = fake_run();
    let path = tmp.path().join("loss.png");
    plot_loss_curve(&path, &train, &val, &PlotOptions { smoothing: 0.9, ..PlotOptions::default() }).unwrap();
    let bytes = fs::read(&path).unwrap();
    assert!(is_png(&bytes) && bytes.len() > 10_000, "{} bytes", bytes.len());
    // Keep a copy for eyeballing when asked.
    if let Ok(dir) = std::env::var("MOR_PLOT_DIR") {
        fs::copy(&path, std::path::Path::new(&dir).join("loss.png")).unwrap();
    }

    let log = tmp.path().join("loss_log.png");
    plot_loss_curve(&log, &train, &[], &PlotOptions { log_y: true, title: "log".into(), ..PlotOptions::default() }).unwrap();
    assert!(is_png(&fs::read(&log).unwrap()));
    if let Ok(dir) = std::env::var("MOR_PLOT_DIR") {
        fs::copy(&log, std::path::Path::new(&dir).join("loss_log.png")).unwrap();
    }

    // Degenerate inputs still produce a chart.
    let empty = tmp.path().join("empty.png");
    plot_loss_curve(&empty, &[], &[], &PlotOptions::default()).unwrap();
    assert!(is_png(&fs::read(&empty).unwrap()));
    let single = tmp.path().join("single.png");
    plot_loss_curve(&single, &[(1.0, 2.0), (2.0, f64::NAN)], &[], &PlotOptions::default()).unwrap();
    assert!(is_png(&fs::read(&single).unwrap()));
}

#[test]
fn plots_a_metrics_file() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = tmp.path().join("metrics.jsonl");
    let mut w = MetricsWriter::create(&metrics).unwrap();
    let (train, val) = fake_run();
    for (s, l) in &train {
        w.log(&Record::train(*s as u64, *l, 3e-3, 1e4, 1.0)).unwrap();
    }
    for (s, l) in &val {
        w.log(&Record::new(*s as u64).with("val_loss", *l)).unwrap();
    }
    let png = tmp.path().join("loss.png");
    plot_metrics_file(&metrics, &png, &PlotOptions::default()).unwrap();
    let bytes = fs::read(&png).unwrap();
    assert!(is_png(&bytes) && bytes.len() > 10_000);
    assert!(plot_metrics_file(&tmp.path().join("missing.jsonl"), &png, &PlotOptions::default()).is_err());
}

#[test]
fn progress_bar_quiet_and_status() {
    let p = Progress::new(100, 10, true);
    assert!(p.is_hidden());
    p.update(11, 3.5, 12_345.0, 3e-3);
    p.println("not shown");
    p.finish();
    assert_eq!(format_status(3.21, 45_000.0, 3e-3), "loss 3.2100 | 45.0k tok/s | lr 3.00e-3");
}
