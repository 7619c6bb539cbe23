//! Line plots (SVG) of result tables: e.g. the capacity cliff, P99 turn latency against the number
//! of agents, one line per policy, with the SLO drawn across.
//!
//! Input is any CSV with a header (a sweep's results.csv, comparison.csv, calibration validation):
//! pick an x column, a y column and a column whose values name the lines; rows that share a line
//! and an x (the seeds of a sweep) are averaged.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{file}: {message}")]
    Input { file: String, message: String },
    #[error("drawing the plot: {0}")]
    Draw(String),
}

/// One line: its label and its (x, y) points sorted by x.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Rows averaged into each point (the same for every point of a full sweep).
    pub rows_per_point: Vec<usize>,
}

/// What to draw.
#[derive(Clone, Debug)]
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// A horizontal reference line (value, label), e.g. the SLO.
    pub hline: Option<(f64, String)>,
    /// Vertical reference lines (x, label), e.g. a capacity bound in agents.
    pub vlines: Vec<(f64, String)>,
    pub log_y: bool,
}

/// Reads `x` / `y` columns grouped by `by` from CSV text, keeping rows whose columns equal the
/// `filters` values; the mean of y over rows sharing (line, x).
pub fn series_from_csv(
    file: &Path,
    text: &str,
    x: &str,
    y: &str,
    by: Option<&str>,
    filters: &[(String, String)],
) -> Result<Vec<Series>, PlotError> {
    let err = |message: String| PlotError::Input {
        file: file.display().to_string(),
        message,
    };
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| err(format!("reading the header: {e}")))?
        .clone();
    let column = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            err(format!(
                "no column `{name}` (columns: {})",
                headers.iter().collect::<Vec<_>>().join(", ")
            ))
        })
    };
    let (xi, yi) = (column(x)?, column(y)?);
    let bi = by.map(column).transpose()?;
    let fi: Vec<(usize, &str)> = filters
        .iter()
        .map(|(k, v)| Ok((column(k)?, v.as_str())))
        .collect::<Result<_, PlotError>>()?;
    // line -> x (as bits, for exact grouping) -> (sum, count)
    let mut acc: BTreeMap<String, BTreeMap<u64, (f64, f64, usize)>> = BTreeMap::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| err(format!("line {line}: {e}")))?;
        if fi.iter().any(|(c, v)| record.get(*c) != Some(*v)) {
            continue;
        }
        let number = |c: usize, name: &str| -> Result<f64, PlotError> {
            let cell = record.get(c).unwrap_or("");
            cell.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    err(format!(
                        "line {line}: column `{name}` = `{cell}` is not a number"
                    ))
                })
        };
        let (xv, yv) = (number(xi, x)?, number(yi, y)?);
        let label = bi
            .map(|c| record.get(c).unwrap_or("").to_string())
            .unwrap_or_else(|| y.to_string());
        let entry = acc
            .entry(label)
            .or_default()
            .entry(xv.to_bits())
            .or_insert((xv, 0.0, 0));
        entry.1 += yv;
        entry.2 += 1;
    }
    if acc.is_empty() {
        return Err(err(if filters.is_empty() {
            "no rows".to_string()
        } else {
            format!("no rows match the filters {filters:?}")
        }));
    }
    Ok(acc
        .into_iter()
        .map(|(label, by_x)| {
            let mut pts: Vec<(f64, f64, usize)> = by_x
                .into_values()
                .map(|(xv, sum, n)| (xv, sum / n as f64, n))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                label,
                points: pts.iter().map(|p| (p.0, p.1)).collect(),
                rows_per_point: pts.iter().map(|p| p.2).collect(),
            }
        })
        .collect())
}

/// The plot as an SVG document.
pub fn line_plot_svg(plot: &LinePlot) -> Result<String, PlotError> {
    let draw = |e: &dyn std::fmt::Display| PlotError::Draw(e.to_string());
    let all: Vec<(f64, f64)> = plot
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    if all.is_empty() {
        return Err(PlotError::Draw("nothing to draw".into()));
    }
    let (x0, x1, y0, y1) = axis_ranges(plot, &all);
    // A log axis is drawn as a linear axis over log10(y) with ticks labelled in y's units (plotters'
    // own log axis leaves most of a 500 ms - 50 s range unlabelled).
    let ty = |y: f64| if plot.log_y { y.log10() } else { y };
    let y_tick = |v: f64| y_tick_label(v, plot.log_y);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(&plot.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72);
        let palette = PALETTE;
        macro_rules! draw_series {
            ($chart:expr) => {{
                let chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(plot.x_label.as_str())
                    .y_desc(plot.y_label.as_str())
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| y_tick(*v))
                    .y_labels(12)
                    .light_line_style(RGBColor(235, 235, 235))
                    .draw()
                    .map_err(|e| draw(&e))?;
                for (i, s) in plot.series.iter().enumerate() {
                    let colour = palette[i % palette.len()];
                    // A line that stops before the others (e.g. a policy that starts rejecting
                    // turns, filtered out) says where, so its absence is not misread.
                    let last_x = s.points.last().map_or(x1, |p| p.0);
                    let label = if last_x < x1 {
                        format!("{} (to {})", s.label, tick(last_x))
                    } else {
                        s.label.clone()
                    };
                    let style = ShapeStyle::from(&colour).stroke_width(2);
                    chart
                        .draw_series(LineSeries::new(
                            s.points.iter().map(|p| (p.0, ty(p.1))),
                            style,
                        ))
                        .map_err(|e| draw(&e))?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                        });
                    chart
                        .draw_series(
                            s.points
                                .iter()
                                .map(|p| Circle::new((p.0, ty(p.1)), 3, colour.filled())),
                        )
                        .map_err(|e| draw(&e))?;
                }
                if let Some((h, label)) = &plot.hline {
                    let grey = RGBColor(90, 90, 90);
                    chart
                        .draw_series(LineSeries::new(
                            vec![(x0, ty(*h)), (x1, ty(*h))],
                            ShapeStyle::from(&grey).stroke_width(1),
                        ))
                        .map_err(|e| draw(&e))?
                        .label(label.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey));
                }
                let dashes = [
                    RGBColor(150, 30, 30),
                    RGBColor(30, 30, 150),
                    RGBColor(30, 110, 30),
                ];
                for (i, (v, label)) in plot.vlines.iter().enumerate() {
                    let colour = dashes[i % dashes.len()];
                    chart
                        .draw_series(DashedLineSeries::new(
                            vec![(*v, y0), (*v, y1)],
                            6,
                            4,
                            ShapeStyle::from(&colour).stroke_width(2),
                        ))
                        .map_err(|e| draw(&e))?
                        .label(label.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                        });
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .background_style(WHITE.mix(0.85))
                    .border_style(RGBColor(200, 200, 200))
                    .draw()
                    .map_err(|e| draw(&e))?;
            }};
        }
        let mut chart = builder
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| draw(&e))?;
        draw_series!(&mut chart);
        root.present().map_err(|e| draw(&e))?;
    }
    Ok(svg)
}

/// The axes' ranges (x0, x1, y0, y1) over every point and the reference line; on a log plot
/// the y range is in log10 units, padded.
fn axis_ranges(plot: &LinePlot, all: &[(f64, f64)]) -> (f64, f64, f64, f64) {
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let (mut y0, mut y1) = (f64::MAX, f64::MIN);
    for (x, y) in all {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if let Some((h, _)) = &plot.hline {
        y0 = y0.min(*h);
        y1 = y1.max(*h);
    }
    for (v, _) in &plot.vlines {
        x0 = x0.min(*v);
        x1 = x1.max(*v);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if plot.log_y {
        y0 = y0.max(1e-9).log10();
        y1 = y1.max(1e-9).log10().max(y0 + 0.3);
        let pad = 0.05 * (y1 - y0);
        (y0, y1) = (y0 - pad, y1 + pad);
    } else {
        y0 = y0.min(0.0);
        if y1 <= y0 {
            y1 = y0 + 1.0;
        }
        y1 *= 1.05;
    }
    (x0, x1, y0, y1)
}

/// A y tick's label: on a log plot `v` is log10(y) and the label is y to two significant digits.
fn y_tick_label(v: f64, log_y: bool) -> String {
    if log_y {
        let y = 10f64.powf(v);
        let digits = (y.log10().floor() as i32 - 1).max(0) as u32;
        let step = 10f64.powi(digits as i32);
        tick((y / step).round() * step)
    } else {
        tick(v)
    }
}

/// Colours from a fixed palette in label order, so the same policies get the same colours in
/// every plot of a report: 20 distinguishable colours (the zoo has 14 policies).
const PALETTE: [RGBColor; 20] = [
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
    RGBColor(0, 0, 0),
    RGBColor(174, 199, 232),
    RGBColor(255, 187, 120),
    RGBColor(152, 223, 138),
    RGBColor(255, 152, 150),
    RGBColor(197, 176, 213),
    RGBColor(196, 156, 148),
    RGBColor(247, 182, 210),
    RGBColor(219, 219, 141),
    RGBColor(158, 218, 229),
];

/// An axis tick without float noise: 5000 -> "5000", 0.25 -> "0.25", 1.5e-7 -> "1.5e-7".
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e7).contains(&a) {
        format!("{v:.1e}")
    } else if (v - v.round()).abs() < 1e-9 * a.max(1.0) {
        format!("{}", v.round() as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "workload,policy,agents,seed,latency_ms_p99\n\
        a,pin,10,0,100\na,pin,10,1,300\na,pin,20,0,9000\na,djinn,20,0,400\na,djinn,10,0,200\n\
        b,pin,10,0,1\n";

    #[test]
    fn ticks_read_like_numbers() {
        assert_eq!(tick(5000.0), "5000");
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(2.5e8), "2.5e8");
    }

    #[test]
    fn rows_are_grouped_by_line_and_averaged_over_seeds() {
        let filters = vec![("workload".to_string(), "a".to_string())];
        let s = series_from_csv(
            Path::new("r.csv"),
            CSV,
            "agents",
            "latency_ms_p99",
            Some("policy"),
            &filters,
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label, "djinn");
        assert_eq!(s[0].points, vec![(10.0, 200.0), (20.0, 400.0)]);
        assert_eq!(s[1].label, "pin");
        assert_eq!(s[1].points, vec![(10.0, 200.0), (20.0, 9000.0)]);
        assert_eq!(s[1].rows_per_point, vec![2, 1]);
    }

    #[test]
    fn bad_columns_and_values_are_named() {
        let e = series_from_csv(
            Path::new("r.csv"),
            CSV,
            "agentz",
            "latency_ms_p99",
            None,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("r.csv") && e.contains("no column `agentz`"),
            "{e}"
        );
        let bad = "agents,y\n1,2\nx,3\n";
        let e = series_from_csv(Path::new("b.csv"), bad, "agents", "y", None, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("`x`"), "{e}");
        let e = series_from_csv(
            Path::new("r.csv"),
            CSV,
            "agents",
            "latency_ms_p99",
            None,
            &[("workload".into(), "zzz".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no rows match"), "{e}");
    }

    #[test]
    fn the_svg_has_one_path_per_line_and_the_labels() {
        let s = series_from_csv(
            Path::new("r.csv"),
            CSV,
            "agents",
            "latency_ms_p99",
            Some("policy"),
            &[("workload".into(), "a".into())],
        )
        .unwrap();
        for log_y in [false, true] {
            let svg = line_plot_svg(&LinePlot {
                title: "cliff".into(),
                x_label: "agents".into(),
                y_label: "P99 ms".into(),
                series: s.clone(),
                hline: Some((5000.0, "SLO 5 s".into())),
                vlines: vec![(200.0, "bound 200".into())],
                log_y,
            })
            .unwrap();
            assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
            for text in ["cliff", "djinn", "pin", "SLO 5 s", "P99 ms", "bound 200"] {
                assert!(svg.contains(text), "missing {text}");
            }
            assert!(
                svg.matches("<polyline").count() >= 3,
                "two series + the SLO line"
            );
        }
    }
}
