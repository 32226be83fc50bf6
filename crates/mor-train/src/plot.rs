//! Loss-curve PNGs with `plotters` (bitmap backend). Text is rendered with DejaVu Sans embedded
//! in the binary (the `dejavu` crate, Bitstream Vera / public-domain licence), registered once
//! with plotters' `ab_glyph` font support, so no system font is needed.
//!
//! ```no_run
//! use mor_train::plot::{plot_metrics_file, PlotOptions};
//! plot_metrics_file("run/metrics.jsonl".as_ref(), "run/loss.png".as_ref(), &PlotOptions::default()).unwrap();
//! ```

use crate::metrics::{read_metrics, series};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::OnceLock;

/// How to draw the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    pub title: String,
    pub width: u32,
    pub height: u32,
    /// Logarithmic loss axis (tick labels still show the loss itself).
    pub log_y: bool,
    /// TensorBoard-style exponential smoothing of the training curve in `[0, 1)`; 0 = off.
    /// When on, the raw curve is drawn faintly behind the smoothed one.
    pub smoothing: f64,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions { title: "Training loss".to_string(), width: 1000, height: 600, log_y: false, smoothing: 0.0 }
    }
}

const FONT: &str = "sans-serif";

fn register_fonts() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("cannot load the embedded DejaVu Sans font"))
    }
}

/// Exponential moving average with TensorBoard's debiasing.
fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut last = 0.0;
    let mut debias = 1.0;
    points
        .iter()
        .map(|&(x, y)| {
            last = last * weight + (1.0 - weight) * y;
            debias *= weight;
            (x, last / (1.0 - debias))
        })
        .collect()
}

fn padded_range(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let pad = if lo.abs() > 1e-12 { lo.abs() * 0.05 } else { 1.0 };
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * frac;
    (lo - pad, hi + pad)
}

/// Draw `train` (and, if not empty, `val`) loss as `(step, loss)` pairs into a PNG at `path`.
/// Non-finite points (and, with `log_y`, non-positive ones) are skipped. An empty `train` still
/// produces a chart with axes.
pub fn plot_loss_curve(path: &Path, train: &[(f64, f64)], val: &[(f64, f64)], opts: &PlotOptions) -> Result<()> {
    register_fonts()?;
    let keep = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite() && (!opts.log_y || p.1 > 0.0);
    let ty = |y: f64| if opts.log_y { y.ln() } else { y };
    let tr: Vec<(f64, f64)> = train.iter().filter(keep).map(|&(x, y)| (x, ty(y))).collect();
    let va: Vec<(f64, f64)> = val.iter().filter(keep).map(|&(x, y)| (x, ty(y))).collect();
    let all = tr.iter().chain(&va);
    let (xmin, xmax) = all.clone().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (x0, x1) = if xmin.is_finite() { padded_range(xmin, xmax, 0.0) } else { (0.0, 1.0) };
    let (y0, y1) = padded_range(ymin, ymax, 0.05);

    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = BitMapBackend::new(path, (opts.width, opts.height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&opts.title, (FONT, 24).into_font().style(FontStyle::Bold))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    let log_y = opts.log_y;
    let ylabel = move |v: &f64| {
        let y = if log_y { v.exp() } else { *v };
        if y.abs() >= 100.0 {
            format!("{y:.0}")
        } else if y.abs() >= 1.0 {
            format!("{y:.2}")
        } else {
            format!("{y:.3}")
        }
    };
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(if log_y { "loss (log scale)" } else { "loss" })
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 15))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&ylabel)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| err(&e))?;

    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(230, 85, 13);
    if !tr.is_empty() {
        if opts.smoothing > 0.0 && opts.smoothing < 1.0 {
            chart
                .draw_series(LineSeries::new(tr.iter().copied(), blue.mix(0.25).stroke_width(1)))
                .map_err(|e| err(&e))?;
            chart
                .draw_series(LineSeries::new(smooth(&tr, opts.smoothing), blue.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("train (smoothed {})", opts.smoothing))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
        } else {
            chart
                .draw_series(LineSeries::new(tr.iter().copied(), blue.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label("train")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
        }
    }
    if !va.is_empty() {
        chart
            .draw_series(LineSeries::new(va.iter().copied(), orange.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("validation")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], orange.stroke_width(2)));
        chart
            .draw_series(va.iter().map(|&p| Circle::new(p, 3, orange.filled())))
            .map_err(|e| err(&e))?;
    }
    if !tr.is_empty() || !va.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(|e| err(&e))?;
    } else {
        root.draw(&Text::new("no data", (opts.width as i32 / 2 - 30, opts.height as i32 / 2), (FONT, 20)))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Plot the `loss` and `val_loss` fields of a metrics JSONL file (see [`crate::metrics`]).
pub fn plot_metrics_file(metrics: &Path, png: &Path, opts: &PlotOptions) -> Result<()> {
    let records = read_metrics(metrics)?;
    plot_loss_curve(png, &series(&records, "loss"), &series(&records, "val_loss"), opts)
}
