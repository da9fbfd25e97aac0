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
    out.push_str(
        "| method | size | wall ms | × memcpy | CPU s | bytes copied | peak extra MiB | host faults | downtime ms | runs |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let ratio = r.ratio_to_memcpy.map_or("–".into(), |x| format!("{x:.3}"));
        let down = r.downtime_ms.map_or("–".into(), |d| format!("{d:.1}"));
        let peak = r.peak_extra_mib.map_or("–".into(), |m| format!("{m:.1}"));
        let faults = r.host_faults.map_or("–".into(), |n| n.to_string());
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {ratio} | {:.2} | {} | {peak} | {faults} | {down} | {} |",
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

/// Wall time against size, log-log, one line per method.
pub fn plot_wall(rows: &[Row], path: &Path) -> Result<(), String> {
    let points: Vec<(&str, f64, f64)> = rows.iter().map(|r| (r.method.as_str(), mib(r), r.wall_ms)).collect();
    plot(&points, "vmbeam make bench: time to hand over / move memory", "wall time (ms)", path)
}

/// Downtime against size for the methods that have one (migrations).
pub fn plot_downtime(rows: &[Row], path: &Path) -> Result<(), String> {
    let points: Vec<(&str, f64, f64)> =
        rows.iter().filter_map(|r| Some((r.method.as_str(), mib(r), r.downtime_ms?))).collect();
    plot(&points, "vmbeam make bench: downtime per VM against its size", "downtime (ms)", path)
}

fn mib(r: &Row) -> f64 {
    r.size as f64 / f64::from(1 << 20)
}

/// (method, size MiB, value) points: log-log, one line per method.
fn plot(points: &[(&str, f64, f64)], caption: &str, y_desc: &str, path: &Path) -> Result<(), String> {
    static FONT_LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    FONT_LOADED
        .get_or_init(|| {
            let font = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (package fonts-dejavu-core)"))?;
            plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
                .map_err(|_| "the plot font did not load".to_string())
        })
        .clone()?;
    let mut methods: Vec<&str> = Vec::new();
    for (m, _, _) in points {
        if !methods.contains(m) {
            methods.push(m);
        }
    }
    // A value of 0 (QEMU reports a downtime under 1 ms as 0) has no place
    // on a log scale: left out rather than drawn at an invented floor.
    let points: Vec<&(&str, f64, f64)> = points.iter().filter(|p| p.1 > 0.0 && p.2 > 0.0).collect();
    let (x_lo, x_hi) = points.iter().fold((f64::MAX, 0f64), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let (y_lo, y_hi) = points.iter().fold((f64::MAX, 0f64), |(lo, hi), p| (lo.min(p.2), hi.max(p.2)));
    // Tall enough for one legend line per method, wide enough for the
    // longest name (DejaVu Sans at 14 px: ~7.5 px a character).
    let height = 760.max(80 + 22 * methods.len() as u32);
    let longest = methods.iter().map(|m| m.chars().count()).max().unwrap_or(0) as u32;
    let legend_width = 600.max(70 + longest * 15 / 2);
    let root = BitMapBackend::new(path, (1000 + legend_width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    // The legend gets its own column: over the plot it hid the lines.
    let (plot_area, legend_area) = root.split_horizontally(1000);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(caption, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo / 1.5..x_hi * 1.5).log_scale(), (y_lo / 2.0..y_hi * 2.0).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("size (MiB)")
        .y_desc(y_desc)
        .x_labels(6)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, method) in methods.iter().enumerate() {
        // Up to 40 lines: no two share both colour and marker.
        let (color, marker) = (COLORS[i % COLORS.len()], Marker::of(i / COLORS.len()));
        let style = ShapeStyle::from(&color).filled();
        let line: Vec<(f64, f64)> = points.iter().filter(|p| p.0 == *method).map(|p| (p.1, p.2)).collect();
        chart.draw_series(LineSeries::new(line.clone(), color.stroke_width(2))).map_err(|e| e.to_string())?;
        for &p in &line {
            marker.draw(chart.plotting_area(), p, style)?;
        }
        let y = 60 + 22 * i as i32;
        legend_area
            .draw(&PathElement::new(vec![(10, y), (40, y)], color.stroke_width(3)))
            .map_err(|e| e.to_string())?;
        marker.draw(&legend_area, (25, y), style)?;
        legend_area.draw(&Text::new(method.to_string(), (48, y - 8), ("sans-serif", 14))).map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Ten colours far apart (Tableau 10): with 36 lines, the 99 of
/// `Palette99` gave neighbours one could not tell apart.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The point marker of each round of [`COLORS`].
#[derive(Clone, Copy)]
enum Marker {
    Circle,
    Triangle,
    Square,
    Cross,
}

impl Marker {
    fn of(round: usize) -> Self {
        [Self::Circle, Self::Triangle, Self::Square, Self::Cross][round % 4]
    }

    /// Draws the marker at `at`, in the coordinates of `area`.
    fn draw<DB: DrawingBackend, CT: plotters::coord::CoordTranslate>(
        self,
        area: &DrawingArea<DB, CT>,
        at: CT::From,
        style: ShapeStyle,
    ) -> Result<(), String> {
        let drawn = match self {
            Self::Circle => area.draw(&Circle::new(at, 4, style)),
            Self::Triangle => area.draw(&TriangleMarker::new(at, 6, style)),
            Self::Square => area.draw(&(EmptyElement::at(at) + Rectangle::new([(-4, -4), (4, 4)], style))),
            Self::Cross => area.draw(&Cross::new(at, 5, style.stroke_width(2))),
        };
        drawn.map_err(|e| e.to_string())
    }
}
