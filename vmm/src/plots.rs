//! SVG plots of a [`Report`]: the latency CDF of each phase, interrupts per vCPU, and the
//! in-flight depth of the busiest queues over time, with the path events (NVMe ANA changes,
//! failures and resets) marked where they happened.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::path_events::Origin;
use crate::stats::Report;

/// In-flight plot: this many of the queues that served the most requests.
const BUSIEST_QUEUES: usize = 8;
const SIZE: (u32, u32) = (900, 520);

type PlotResult<T> = Result<T, String>;

fn plot_error(error: impl std::fmt::Display) -> String {
    error.to_string()
}

fn palette(index: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    COLORS[index % COLORS.len()]
}

/// Writes every plot of `report` into `dir`; returns the files written.
pub fn render(report: &Report, dir: &Path) -> PlotResult<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(plot_error)?;
    let mut written = Vec::new();
    if !report.phases.is_empty() {
        let path = dir.join("latency_cdf.svg");
        latency_cdf(report, &path)?;
        written.push(path);
    }
    if !report.interrupts_by_vcpu.is_empty() {
        let path = dir.join("interrupts_per_vcpu.svg");
        interrupts_per_vcpu(report, &path)?;
        written.push(path);
    }
    if report
        .disks
        .iter()
        .flat_map(|disk| &disk.queues)
        .any(|queue| queue.in_flight_series.is_some())
    {
        let path = dir.join("in_flight.svg");
        in_flight(report, &path)?;
        written.push(path);
    }
    Ok(written)
}

/// One line per phase: microseconds (log scale) against the fraction of requests.
fn latency_cdf(report: &Report, path: &Path) -> PlotResult<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let microseconds = |ns: u64| (ns as f64 / 1e3).max(0.01);
    let max = report
        .phases
        .values()
        .flat_map(|phase| phase.cdf.iter().map(|&(_, ns)| microseconds(ns)))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Host-side latency per phase ({} requests)", report.requests),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((0.01f64..max * 1.5).log_scale(), 0f64..1f64)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("microseconds")
        .y_desc("fraction of requests")
        .draw()
        .map_err(plot_error)?;
    for (index, (name, phase)) in report.phases.iter().enumerate() {
        let color = palette(index);
        let points: Vec<(f64, f64)> = phase
            .cdf
            .iter()
            .map(|&(quantile, ns)| (microseconds(ns), quantile))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_error)?
            .label(format!(
                "{name} (p50 {:.1} us)",
                phase.stats.p50 as f64 / 1e3
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}

/// One bar per vCPU: MSI-X interrupts the disks sent it.
fn interrupts_per_vcpu(report: &Report, path: &Path) -> PlotResult<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let vcpus = report.interrupts_by_vcpu.keys().max().copied().unwrap_or(0) + 1;
    let max = report
        .interrupts_by_vcpu
        .values()
        .max()
        .copied()
        .unwrap_or(1);
    let mut chart = ChartBuilder::on(&root)
        .caption("MSI-X interrupts per vCPU", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0u32..vcpus).into_segmented(), 0u64..max + max / 10 + 1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("vCPU (destination APIC id)")
        .y_desc("interrupts")
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .style(palette(0).filled())
                .margin(8)
                .data(
                    report
                        .interrupts_by_vcpu
                        .iter()
                        .map(|(&vcpu, &count)| (vcpu, count)),
                ),
        )
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}

/// Path events marked on the in-flight plot; later ones are left out (the JSON has them).
const MARKED_PATH_EVENTS: usize = 32;

/// The deepest in-flight count per sample interval, for the busiest queues, and a vertical
/// line at each path event (red: the host's, blue: a guest's reset) labelled with it.
fn in_flight(report: &Report, path: &Path) -> PlotResult<()> {
    let mut queues: Vec<(String, &crate::stats::QueueReport)> = report
        .disks
        .iter()
        .flat_map(|disk| {
            disk.queues
                .iter()
                .map(move |queue| (format!("{} {}", disk.pci, queue.queue), queue))
        })
        .filter(|(_, queue)| queue.in_flight_series.is_some())
        .collect();
    queues.sort_by_key(|(_, queue)| std::cmp::Reverse(queue.requests));
    queues.truncate(BUSIEST_QUEUES);
    let series: Vec<(String, Vec<(f64, f64)>)> = queues
        .into_iter()
        .filter_map(|(label, queue)| {
            let series = queue.in_flight_series.as_ref()?;
            let points = (0..)
                .zip(&series.max_depth)
                .map(|(i, &depth)| {
                    let seconds = (series.start_ms + f64::from(i) * series.interval_ms) / 1e3;
                    (seconds, f64::from(depth))
                })
                .collect();
            Some((label, points))
        })
        .collect();
    let events = &report.path_events[..report.path_events.len().min(MARKED_PATH_EVENTS)];
    let end = series
        .iter()
        .flat_map(|(_, points)| points.last().map(|&(t, _)| t))
        .chain(events.iter().map(|event| event.at_ms / 1e3))
        .fold(0.1, f64::max);
    let deepest = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|&(_, depth)| depth))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Requests in flight (busiest queues)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..end, 0f64..deepest * 1.1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the VMM started")
        .y_desc("in flight (max per interval)")
        .draw()
        .map_err(plot_error)?;
    for (index, (label, points)) in series.into_iter().enumerate() {
        let color = palette(index);
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    let top = deepest * 1.1;
    for (index, event) in events.iter().enumerate() {
        let x = event.at_ms / 1e3;
        let color = match event.by {
            Origin::Host => RGBColor(200, 30, 30),
            Origin::Guest => RGBColor(30, 60, 200),
        };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, top)],
                color.stroke_width(1),
            )))
            .map_err(plot_error)?;
        // Staggered, so that events close in time stay readable.
        let y = top * (0.97 - 0.06 * (index % 8) as f64);
        let label = format!("{} {} ({})", event.by.name(), event.event, event.pci);
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (x, y),
                ("sans-serif", 11).into_font().color(&color),
            )))
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}
