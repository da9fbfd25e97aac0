//! The bench's results: a Markdown table, JSON and a log-log plot (time
//! against size, one line per method).

use std::{fmt::Write as _, path::Path};

use plotters::prelude::*;

use crate::bench::{size_name, Row};

/// Fills each row's ratio to memcpy at the same size.
pub fn add_ratios(rows: &mut [Row]) {
    let memcpy: Vec<(u64, f64)> = rows.iter().filter(|r| r.method == "memcpy").map(|r| (r.size, r.wall_ms)).collect();
    for r in rows.iter_mut() {
        r.ratio_to_memcpy =
            memcpy.iter().find(|(size, _)| *size == r.size).filter(|(_, ms)| *ms > 0.0).map(|(_, ms)| r.wall_ms / ms);
    }
}

pub fn markdown(rows: &[Row], header: &str) -> String {
    let mut out = format!("{header}\n\n");
    out.push_str("| method | size | wall ms | × memcpy | CPU s | bytes copied | downtime ms | runs |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let ratio = r.ratio_to_memcpy.map_or("–".into(), |x| format!("{x:.3}"));
        let down = r.downtime_ms.map_or("–".into(), |d| format!("{d:.1}"));
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {ratio} | {:.2} | {} | {down} | {} |",
            r.method,
            size_name(r.size),
            r.wall_ms,
            r.cpu_s,
            r.bytes_copied,
            r.runs
        );
    }
    out
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// time (ms) against size (MiB), log-log, one line per method.
pub fn plot(rows: &[Row], path: &Path) -> Result<(), String> {
    let font = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (package fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| "the plot font did not load".to_string())?;
    let mut methods: Vec<&'static str> = Vec::new();
    for r in rows {
        if !methods.contains(&r.method) {
            methods.push(r.method);
        }
    }
    let mib = |r: &Row| r.size as f64 / f64::from(1 << 20);
    let (x_lo, x_hi) = rows.iter().map(mib).fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (y_lo, y_hi) =
        rows.iter().map(|r| r.wall_ms.max(1e-3)).fold((f64::MAX, 0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let root = BitMapBackend::new(path, (1100, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("vmbeam make bench: time to hand over / move memory", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo / 1.5..x_hi * 1.5).log_scale(), (y_lo / 2.0..y_hi * 2.0).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("size (MiB)")
        .y_desc("wall time (ms)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, method) in methods.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> =
            rows.iter().filter(|r| r.method == *method).map(|r| (mib(r), r.wall_ms.max(1e-3))).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(*method)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
