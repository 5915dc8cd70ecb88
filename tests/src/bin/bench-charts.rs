//! Draws the benchmarks' charts (PNG) from what the benchmarks wrote:
//! - `docs/charts/drain-rounds.png`: the backlog drain per round, mqplug,
//!   the native consumer and the Go push consumer (`target/bench-results/drain-rounds.csv`,
//!   from `cargo bench -p mqplug-tests --bench broker_throughput`);
//! - `docs/charts/latency.png`: publish-to-handled percentiles, mqplug and
//!   the Go push consumer (`target/bench-results/latency.csv`, from `cargo
//!   bench -p mqplug-tests --bench latency`);
//! - `docs/charts/per-event-cost.png`: time per event by mode (criterion's
//!   estimates under `target/criterion/per_event`, from `cargo bench -p
//!   mqplug-tests --bench dispatch`);
//! - `docs/charts/many-plugins.png`: resident memory and drain per plugin
//!   by plugin count (`target/bench-results/many-plugins.csv`, from `cargo
//!   bench -p mqplug --bench many_plugins`).
//!
//! A chart whose data is missing is skipped, saying so.
//!
//!   cargo run -p mqplug-tests --features charts --bin bench-charts

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const MQPLUG: RGBColor = RGBColor(33, 102, 172);
const BASELINE: RGBColor = RGBColor(150, 150, 150);
const GO: RGBColor = RGBColor(0, 173, 216);

/// Draws one chart to the path given.
type Draw<'a> = Box<dyn Fn(&Path) -> Result<()> + 'a>;

fn main() -> Result<()> {
    let font = std::fs::read(FONT).with_context(|| {
        format!("the charts need DejaVu Sans at {FONT} (Debian's fonts-dejavu-core)")
    })?;
    if register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .is_err()
    {
        bail!("{FONT} is not a usable font");
    }
    let root = mqplug_tests::workspace_root();
    let results = root.join("target/bench-results");
    let out = root.join("docs/charts");
    std::fs::create_dir_all(&out)?;
    let charts: [(&str, Draw<'_>); 4] = [
        (
            "drain-rounds.png",
            Box::new(|path| drain_rounds(&results.join("drain-rounds.csv"), path)),
        ),
        (
            "latency.png",
            Box::new(|path| latency(&results.join("latency.csv"), path)),
        ),
        (
            "per-event-cost.png",
            Box::new(|path| per_event_cost(&root.join("target/criterion/per_event"), path)),
        ),
        (
            "many-plugins.png",
            Box::new(|path| many_plugins(&results.join("many-plugins.csv"), path)),
        ),
    ];
    for (name, draw) in charts {
        let path = out.join(name);
        match draw(&path) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(err) => println!("skipped {name}: {err:#}"),
        }
    }
    Ok(())
}

/// The rows of a CSV file with a header, as numbers.
fn csv(path: &Path) -> Result<Vec<Vec<f64>>> {
    csv_labelled(path)?
        .into_iter()
        .map(|(first, rest)| {
            let mut row = vec![first.parse::<f64>()?];
            row.extend(rest);
            Ok(row)
        })
        .collect()
}

/// A CSV whose first column is a label and the rest numbers.
fn csv_labelled(path: &Path) -> Result<Vec<(String, Vec<f64>)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{} (run its benchmark first)", path.display()))?;
    text.lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut cells = line.split(',');
            let label = cells.next().unwrap_or_default().trim().to_string();
            let values = cells
                .map(|cell| cell.trim().parse::<f64>().map_err(Into::into))
                .collect::<Result<_>>()?;
            Ok((label, values))
        })
        .collect()
}

/// A chart on a white `area`: `title`, a y axis from 0 to `top` (at least
/// 1), and one slot on the x axis per label, named under its middle.
fn frame<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    title: &str,
    y_label: &str,
    labels: &[String],
    top: f64,
    label_size: u32,
) -> Result<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    area.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..labels.len() as f64, 0f64..top.max(1.0))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(labels.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let index = x.floor() as usize;
            if (x - index as f64 - 0.5).abs() < 0.01 {
                labels.get(index).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .label_style(("sans-serif", label_size))
        .draw()?;
    Ok(chart)
}

/// Grouped bars: for each label, one bar per series.
fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    labels: &[String],
    series: &[(&str, RGBColor, Vec<f64>)],
) -> Result<()> {
    let top = series
        .iter()
        .flat_map(|(_, _, values)| values.iter().copied())
        .fold(0.0f64, f64::max)
        * 1.35; // room for the legend above the tallest bar
    let area = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    let mut chart = frame(&area, title, y_label, labels, top, 15)?;
    let width = 0.8 / series.len() as f64;
    for (s, (name, color, values)) in series.iter().enumerate() {
        let color = *color;
        chart
            .draw_series(values.iter().enumerate().map(|(i, value)| {
                let x0 = i as f64 + 0.1 + s as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.95, *value)], color.filled())
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    area.present()?;
    Ok(())
}

/// One bar per label, each in its own colour, its value written above it.
fn bars(path: &Path, title: &str, y_label: &str, bars: &[(String, f64, RGBColor)]) -> Result<()> {
    let top = bars
        .iter()
        .map(|(_, value, _)| *value)
        .fold(0.0f64, f64::max)
        * 1.2;
    let area = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    let names: Vec<String> = bars.iter().map(|(label, _, _)| label.clone()).collect();
    let mut chart = frame(&area, title, y_label, &names, top, 14)?;
    for (i, (_, value, color)) in bars.iter().enumerate() {
        let x0 = i as f64 + 0.2;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x0, 0.0), (x0 + 0.6, *value)],
            color.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{value:.2}"),
            (i as f64 + 0.38, value + top * 0.03),
            ("sans-serif", 16),
        )))?;
    }
    area.present()?;
    Ok(())
}

fn drain_rounds(csv_path: &Path, path: &Path) -> Result<()> {
    let rows = csv(csv_path)?;
    if rows.is_empty() {
        bail!("no rounds in {}", csv_path.display());
    }
    let labels: Vec<String> = rows.iter().map(|r| format!("round {}", r[0])).collect();
    grouped_bars(
        path,
        "Backlog drain per round (order rotated)",
        "messages per second",
        &labels,
        &[
            (
                "mqplug, no-op plugin",
                MQPLUG,
                rows.iter().map(|r| r[1]).collect(),
            ),
            (
                "native Rust consumer",
                BASELINE,
                rows.iter().map(|r| r[2]).collect(),
            ),
            (
                "Go push consumer (the platform's)",
                GO,
                // Rounds written before the Go consumer joined have no column.
                rows.iter()
                    .map(|r| r.get(3).copied().unwrap_or(0.0))
                    .collect(),
            ),
        ],
    )
}

fn latency(csv_path: &Path, path: &Path) -> Result<()> {
    let rows = csv_labelled(csv_path)?;
    if rows.is_empty() {
        bail!("no percentiles in {}", csv_path.display());
    }
    let labels: Vec<String> = rows.iter().map(|(label, _)| label.clone()).collect();
    grouped_bars(
        path,
        "Publish to handled at a steady rate, side by side",
        "milliseconds",
        &labels,
        &[
            (
                "mqplug, no-op plugin",
                MQPLUG,
                rows.iter().map(|(_, r)| r[0]).collect(),
            ),
            (
                "Go push consumer (the platform's)",
                GO,
                rows.iter().map(|(_, r)| r[1]).collect(),
            ),
        ],
    )
}

fn per_event_cost(dir: &Path, path: &Path) -> Result<()> {
    let modes = [
        ("direct_wasmtime_call", "call, one instance"),
        ("mqplug_reused_instance", "mqplug reused"),
        ("mqplug_fresh_instance", "mqplug fresh"),
        (
            "direct_wasmtime_pooled_instantiate_pre_and_call",
            "fresh, pooled",
        ),
        (
            "direct_wasmtime_instantiate_pre_and_call",
            "fresh, default engine",
        ),
    ];
    let mut shown = Vec::new();
    for (bench, label) in modes {
        let estimate: PathBuf = dir.join(bench).join("new/estimates.json");
        let text = std::fs::read_to_string(&estimate)
            .with_context(|| format!("{} (run the dispatch bench first)", estimate.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)?;
        let micros = json["mean"]["point_estimate"]
            .as_f64()
            .context("a mean in criterion's estimates")?
            / 1000.0;
        let color = if bench.starts_with("mqplug") {
            MQPLUG
        } else {
            BASELINE
        };
        shown.push((label.to_string(), micros, color));
    }
    bars(
        path,
        "Time per event by mode, no-op plugin (blue: mqplug, grey: bare wasmtime)",
        "microseconds",
        &shown,
    )
}

fn many_plugins(csv_path: &Path, path: &Path) -> Result<()> {
    let rows = csv(csv_path)?;
    if rows.is_empty() {
        bail!("no rows in {}", csv_path.display());
    }
    let labels: Vec<String> = rows.iter().map(|r| format!("{} plugins", r[0])).collect();
    grouped_bars(
        path,
        "Many plugins per host: idle memory and total drain",
        "MiB idle / thousand msg/s",
        &labels,
        &[
            (
                "idle resident memory (MiB)",
                MQPLUG,
                rows.iter().map(|r| r[2] / 1048576.0).collect(),
            ),
            (
                "drain, all plugins (thousand msg/s)",
                BASELINE,
                rows.iter().map(|r| r[5] / 1000.0).collect(),
            ),
        ],
    )
}
