//! SVG plots of a [`Report`]: the latency CDF of each phase, interrupts per vCPU, the
//! in-flight depth of the busiest queues over time, with the path events (NVMe ANA changes,
//! failures and resets) marked where they happened, and the same queues' requests at the
//! backend by direction with the age of each direction's oldest.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::path_events::Origin;
use crate::stats::{QueueReport, Report, SeriesReport};

/// In-flight plot: this many of the queues that served the most requests.
const BUSIEST_QUEUES: usize = 8;
const SIZE: (u32, u32) = (900, 520);
/// In-flight-by-direction plot: this many queues (up to three lines each), two panels.
const BUSIEST_OP_QUEUES: usize = 4;
const BY_OP_SIZE: (u32, u32) = (900, 800);
/// Bottom of the oldest-age axis (log scale), ms: ticks with nothing in flight sit on it.
const AGE_FLOOR_MS: f64 = 0.01;

type PlotResult<T> = Result<T, String>;

fn plot_error(error: impl std::fmt::Display) -> String {
    error.to_string()
}

/// The legend of `chart`'s labelled series, at `position`, as every plot here draws it.
fn draw_legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> PlotResult<()>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
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
    if report
        .disks
        .iter()
        .flat_map(|disk| &disk.queues)
        .filter_map(|queue| queue.in_flight_series.as_ref())
        .any(|series| !series.by_op.is_empty())
    {
        let path = dir.join("in_flight_by_op.svg");
        in_flight_by_op(report, &path)?;
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
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
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
    let mut queues: Vec<(String, &QueueReport)> = report
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
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(plot_error)
}

/// Reads blue, writes red, others green; later queues of the same direction paler.
fn op_color(op: &str, rank: usize) -> RGBAColor {
    let base = match op {
        "read" => RGBColor(31, 119, 180),
        "write" => RGBColor(214, 39, 40),
        _ => RGBColor(44, 160, 44),
    };
    base.mix(1.0 - 0.2 * rank.min(3) as f64)
}

/// One line of the by-direction plot: its label, colour, counts and oldest ages (ms) over
/// seconds since the VMM started.
struct OpLine {
    label: String,
    color: RGBAColor,
    counts: Vec<(f64, f64)>,
    ages_ms: Vec<(f64, f64)>,
}

fn op_lines(queues: &[(String, &SeriesReport)]) -> Vec<OpLine> {
    let mut lines = Vec::new();
    for (rank, (label, series)) in queues.iter().enumerate() {
        let seconds = |i: usize| (series.start_ms + i as f64 * series.interval_ms) / 1e3;
        for (op, values) in &series.by_op {
            // Trailing zeros are left out of the report: the series runs as long as the depth.
            let len = series.max_depth.len().max(values.max_count.len());
            let value = |values: &[u32], i: usize| f64::from(values.get(i).copied().unwrap_or(0));
            lines.push(OpLine {
                label: format!("{label} {op}"),
                color: op_color(op, rank),
                counts: (0..len)
                    .map(|i| (seconds(i), value(&values.max_count, i)))
                    .collect(),
                ages_ms: (0..len)
                    .map(|i| {
                        let ms = value(&values.max_oldest_us, i) / 1e3;
                        (seconds(i), ms.max(AGE_FLOOR_MS))
                    })
                    .collect(),
            });
        }
    }
    lines
}

/// For the busiest queues with per-direction series: requests at the backend by direction
/// (top) and the age of each direction's oldest (bottom, log scale), the largest at the
/// ticks of each interval: writes held for seconds beside reads that come and go.
fn in_flight_by_op(report: &Report, path: &Path) -> PlotResult<()> {
    let mut queues: Vec<(String, &QueueReport, &SeriesReport)> = report
        .disks
        .iter()
        .flat_map(|disk| {
            disk.queues.iter().filter_map(move |queue| {
                let series = queue.in_flight_series.as_ref()?;
                let label = format!("{} {}", disk.pci, queue.queue);
                (!series.by_op.is_empty()).then_some((label, queue, series))
            })
        })
        .collect();
    queues.sort_by_key(|(_, queue, _)| std::cmp::Reverse(queue.requests));
    queues.truncate(BUSIEST_OP_QUEUES);
    let queues: Vec<(String, &SeriesReport)> = queues
        .into_iter()
        .map(|(label, _, series)| (label, series))
        .collect();
    let lines = op_lines(&queues);
    let end = lines
        .iter()
        .flat_map(|line| line.counts.last().map(|&(t, _)| t))
        .fold(0.1, f64::max);
    let most = lines
        .iter()
        .flat_map(|line| line.counts.iter().map(|&(_, count)| count))
        .fold(1.0, f64::max);
    let oldest = lines
        .iter()
        .flat_map(|line| line.ages_ms.iter().map(|&(_, ms)| ms))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, BY_OP_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (upper, lower) = root.split_vertically(BY_OP_SIZE.1 / 2);

    let mut counts = ChartBuilder::on(&upper)
        .caption(
            "Requests at the backend by direction (busiest queues)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..end, 0f64..most * 1.1)
        .map_err(plot_error)?;
    counts
        .configure_mesh()
        .x_desc("seconds since the VMM started")
        .y_desc("in flight (max per interval)")
        .draw()
        .map_err(plot_error)?;
    for line in &lines {
        let color = line.color;
        counts
            .draw_series(LineSeries::new(
                line.counts.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(line.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    draw_legend(&mut counts, SeriesLabelPosition::UpperRight)?;

    let mut ages = ChartBuilder::on(&lower)
        .caption(
            "Age of the oldest request at the backend, by direction",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..end, (AGE_FLOOR_MS..oldest * 1.5).log_scale())
        .map_err(plot_error)?;
    ages.configure_mesh()
        .x_desc("seconds since the VMM started")
        .y_desc("oldest in flight, ms (max per interval)")
        .draw()
        .map_err(plot_error)?;
    for line in &lines {
        let color = line.color;
        ages.draw_series(LineSeries::new(
            line.ages_ms.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(plot_error)?
        .label(line.label.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    draw_legend(&mut ages, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(plot_error)
}
