//! `djinn plot`: a line plot (SVG) of any result CSV, e.g. the capacity cliff of a sweep.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A CSV with a header: a sweep's results.csv, a comparison.csv, a calibration validation CSV.
    #[arg(value_name = "CSV")]
    pub csv: PathBuf,
    /// Column for the x axis.
    #[arg(long, default_value = "agents")]
    pub x: String,
    /// Column for the y axis (rows sharing a line and an x, e.g. seeds, are averaged).
    #[arg(long, default_value = "latency_ms_p99")]
    pub y: String,
    /// Column whose values name the lines ("" for one line).
    #[arg(long, default_value = "policy")]
    pub by: String,
    /// Keep only rows where COLUMN equals VALUE (repeat for several).
    #[arg(long = "where", value_name = "COLUMN=VALUE")]
    pub filters: Vec<String>,
    /// Draw a horizontal line at this y (e.g. the SLO in ms).
    #[arg(long, value_name = "Y")]
    pub hline: Option<f64>,
    /// Label of the horizontal line.
    #[arg(long, default_value = "SLO")]
    pub hline_label: String,
    /// Draw a vertical dashed line at this x, with an optional label (e.g. a capacity bound:
    /// `--vline "231=compute bound"`). Repeat for several.
    #[arg(long, value_name = "X[=LABEL]")]
    pub vline: Vec<String>,
    /// Logarithmic y axis (latencies past the cliff span orders of magnitude).
    #[arg(long)]
    pub log_y: bool,
    /// Plot title (default: "Y vs X" and the filters).
    #[arg(long)]
    pub title: Option<String>,
    /// Output SVG (default: the CSV's path with the extension .svg).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(args: PlotArgs) -> Result<()> {
    let filters: Vec<(String, String)> = args
        .filters
        .iter()
        .map(|f| match f.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("--where `{f}`: expected COLUMN=VALUE"),
        })
        .collect::<Result<_>>()?;
    if let Some(h) = args.hline {
        if !h.is_finite() || (args.log_y && h <= 0.0) {
            bail!("--hline must be a finite number (> 0 with --log-y), got {h}");
        }
    }
    let vlines: Vec<(f64, String)> = args
        .vline
        .iter()
        .map(|v| {
            let (x, label) = v.split_once('=').unwrap_or((v.as_str(), ""));
            match x.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Ok((
                    x,
                    if label.is_empty() {
                        format!("x = {x}")
                    } else {
                        label.to_string()
                    },
                )),
                _ => bail!("--vline `{v}`: expected X or X=LABEL with X a finite number"),
            }
        })
        .collect::<Result<_>>()?;
    let text = std::fs::read_to_string(&args.csv)
        .with_context(|| format!("reading {}", args.csv.display()))?;
    let by = (!args.by.is_empty()).then_some(args.by.as_str());
    let series = analysis::plot::series_from_csv(&args.csv, &text, &args.x, &args.y, by, &filters)?;
    if args.log_y {
        if let Some(s) = series.iter().find(|s| s.points.iter().any(|p| p.1 <= 0.0)) {
            bail!(
                "--log-y: line `{}` has a value <= 0 in column `{}`",
                s.label,
                args.y
            );
        }
    }
    let title = args.title.clone().unwrap_or_else(|| {
        let mut t = format!("{} vs {}", args.y, args.x);
        if !filters.is_empty() {
            let f: Vec<String> = filters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            t += &format!(" ({})", f.join(", "));
        }
        t
    });
    let svg = analysis::plot::line_plot_svg(&analysis::plot::LinePlot {
        title,
        x_label: args.x.clone(),
        y_label: args.y.clone(),
        series: series.clone(),
        hline: args.hline.map(|h| (h, args.hline_label.clone())),
        vlines,
        log_y: args.log_y,
    })?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.csv.with_extension("svg"));
    traces::write_atomic(&out, svg.as_bytes())?;
    let points: usize = series.iter().map(|s| s.points.len()).sum();
    println!(
        "wrote {} ({} lines, {} points)",
        out.display(),
        series.len(),
        points
    );
    Ok(())
}
