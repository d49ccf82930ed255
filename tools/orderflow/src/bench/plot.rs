//! SVG plots: the latency percentile curve and throughput over time, system and baseline.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use super::report::Scenario;

const SIZE: (u32, u32) = (800, 420);

/// One line of a plot: its label, its data and its colour.
type Series<'a, T> = (&'a str, &'a T, RGBColor);

/// Where a percentile sits on the x axis: the number of nines (50% → 0.3, 99% → 2, 99.9% → 3).
fn nines(percentile: f64) -> f64 {
    let tail = (1.0 - percentile / 100.0).max(1e-5);
    -tail.log10()
}

/// The latency percentile curve.
pub fn latency(path: &Path, s: &Scenario) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let series: Vec<Series<'_, Vec<(f64, f64)>>> =
        std::iter::once(("system", &s.system.percentiles, BLUE))
            .chain(
                s.baseline
                    .iter()
                    .map(|b| ("baseline", &b.percentiles, RGBColor(200, 80, 0))),
            )
            .collect();
    let max_ms = series
        .iter()
        .flat_map(|(_, p, _)| p.iter().map(|(_, ms)| *ms))
        .fold(0.1, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: latency by percentile (ms)", s.name),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..5.0, 0.0..max_ms * 1.1)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_labels(6)
        .x_label_formatter(&|x: &f64| match x.round() as i64 {
            0 => "0%".into(),
            1 => "90%".into(),
            2 => "99%".into(),
            3 => "99.9%".into(),
            4 => "99.99%".into(),
            _ => "max".into(),
        })
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (label, points, colour) in series {
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|(p, ms)| (nines(*p), *ms)),
                colour.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Completions per second over the run.
pub fn throughput(path: &Path, s: &Scenario) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let series: Vec<Series<'_, Vec<u64>>> = std::iter::once(("system", &s.system.per_second, BLUE))
        .chain(
            s.baseline
                .iter()
                .map(|b| ("baseline", &b.per_second, RGBColor(200, 80, 0))),
        )
        .collect();
    let max = series
        .iter()
        .flat_map(|(_, v, _)| v.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let len = series
        .iter()
        .map(|(_, v, _)| v.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: completions per second", s.name),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..len, 0.0..max * 1.1)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("per second")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (label, values, colour) in series {
        chart
            .draw_series(LineSeries::new(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (i as f64, *v as f64)),
                colour.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
