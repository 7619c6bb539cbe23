//! Fitting a GPU profile's cost coefficients to the steps and swaps of real runs.
//!
//! What is fitted (the rest of the profile -- model sizes, memory -- is kept from a base profile,
//! because it is a fact about the model and the card, not a rate):
//! - the step form `roofline-v1` (`traces::GpuProfile::step_ns`): step overhead, per-sequence cost,
//!   memory bandwidth, matmul and attention throughput, and the serial fraction (how much of the
//!   smaller of memory and compute time real kernels fail to overlap);
//! - each copy direction's bandwidth, from the copy engine's own start/end times in swaps.csv.
//!
//! Objective: a robust (Cauchy) loss of the log ratio of predicted to measured step time, averaged
//! per step kind (decode-only, prefill-only, mixed) and then across kinds, so a few hundred prefill
//! steps weigh as much as thousands of decode steps, a 5 ms step counts as much as a 50 ms one,
//! relatively, and one-time warm-up steps (algorithm tuning, graph capture) count as outliers.
//! Minimised by Nelder-Mead from fixed starting points (no randomness: the same traces give the
//! same profile), over the log of the overheads, the logit of the serial fraction, and rates
//! bounded to `RATE_HEADROOM` x the base profile's measured ceilings.

use std::collections::BTreeMap;

use traces::{CopyChannel, GpuProfile, Provenance, StepRecord, StepShape, SwapRecord};

/// The three kinds of step, reported separately because they stress different coefficients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StepKind {
    Decode,
    Prefill,
    Mixed,
}

impl StepKind {
    pub fn of(shape: &StepShape) -> Option<StepKind> {
        match (shape.prefill_tokens > 0.0, shape.decode_sequences > 0.0) {
            (false, true) => Some(StepKind::Decode),
            (true, false) => Some(StepKind::Prefill),
            (true, true) => Some(StepKind::Mixed),
            (false, false) => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StepKind::Decode => "decode",
            StepKind::Prefill => "prefill",
            StepKind::Mixed => "mixed",
        }
    }
}

/// One measured step.
#[derive(Clone, Debug)]
pub struct StepSample {
    /// Which run it came from (leave-one-run-out validation groups by this).
    pub run: String,
    pub kind: StepKind,
    pub shape: StepShape,
    pub duration_ns: f64,
}

/// Steps of one run usable for fitting: those that did work and took a positive time.
pub fn step_samples(run: &str, steps: &[StepRecord]) -> Vec<StepSample> {
    steps
        .iter()
        .filter(|s| s.duration_ns > 0)
        .filter_map(|s| {
            let shape = StepShape::from_record(s);
            StepKind::of(&shape).map(|kind| StepSample {
                run: run.to_string(),
                kind,
                shape,
                duration_ns: s.duration_ns as f64,
            })
        })
        .collect()
}

/// Per-kind error of a profile on a set of samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KindError {
    pub steps: usize,
    /// Mean |predicted - measured| / measured.
    pub mape: f64,
    /// Median of predicted / measured (1 = unbiased; < 1 = the profile is optimistic).
    pub ratio_p50: f64,
    /// Steps measured at more than 1.5x or less than 1/1.5 of the prediction.
    pub outliers: usize,
}

/// Error of `profile` on `samples`, per step kind and over all steps (key `None`).
pub fn errors(
    profile: &GpuProfile,
    samples: &[StepSample],
) -> BTreeMap<Option<StepKind>, KindError> {
    let mut ratios: BTreeMap<Option<StepKind>, Vec<f64>> = BTreeMap::new();
    for s in samples {
        let ratio = profile.step_ns(&s.shape) / s.duration_ns;
        ratios.entry(Some(s.kind)).or_default().push(ratio);
        ratios.entry(None).or_default().push(ratio);
    }
    ratios
        .into_iter()
        .map(|(kind, mut r)| {
            let mape = r.iter().map(|x| (x - 1.0).abs()).sum::<f64>() / r.len() as f64;
            let outliers = r.iter().filter(|x| !(1.0 / 1.5..=1.5).contains(*x)).count();
            r.sort_by(f64::total_cmp);
            let mid = r.len() / 2;
            let ratio_p50 = if r.len() % 2 == 1 {
                r[mid]
            } else {
                (r[mid - 1] + r[mid]) / 2.0
            };
            (
                kind,
                KindError {
                    steps: r.len(),
                    mape,
                    ratio_p50,
                    outliers,
                },
            )
        })
        .collect()
}

/// Fitted copy-channel figures of one direction.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelFit {
    pub swaps: usize,
    pub bytes: u64,
    /// Sum of bytes / sum of (copy time - the base latency).
    pub bandwidth_bytes_per_s: f64,
}

/// Everything a fit produced.
#[derive(Clone, Debug)]
pub struct FitReport {
    pub profile: GpuProfile,
    pub samples: usize,
    /// Errors of the base profile and of the fitted one, in-sample.
    pub base_errors: BTreeMap<Option<StepKind>, KindError>,
    pub fitted_errors: BTreeMap<Option<StepKind>, KindError>,
    /// Per run: the error on that run of a profile fitted to the other runs (needs >= 2 runs).
    pub leave_one_run_out: BTreeMap<String, BTreeMap<Option<StepKind>, KindError>>,
    pub host_to_device: Option<ChannelFit>,
    pub device_to_host: Option<ChannelFit>,
}

#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error("no usable steps to fit (every step of the given runs had zero duration or no work)")]
    NoSteps,
    #[error("the fit did not converge to finite coefficients")]
    NotFinite,
}

const PARAMS: usize = 6;

/// How far above the base profile's rate a fitted rate may go. The base rates are measured
/// ceilings (device copy bandwidth, GEMM throughput on random data), so a fit that wants more is
/// trading one coefficient against another (e.g. a fixed step overhead against the weight read
/// time, which every decode step shares) rather than measuring something.
pub const RATE_HEADROOM: f64 = 1.15;

fn bounded(x: f64, cap: f64) -> f64 {
    cap / (1.0 + (-x).exp())
}

fn unbounded(v: f64, cap: f64) -> f64 {
    let r = (v / cap).clamp(1e-6, 1.0 - 1e-6);
    (r / (1.0 - r)).ln()
}

fn unpack(base: &GpuProfile, x: &[f64; PARAMS]) -> GpuProfile {
    let mut p = base.clone();
    let b = &base.cost;
    let c = &mut p.cost;
    c.step_overhead_ns = x[0].exp();
    c.per_sequence_ns = x[1].exp();
    c.memory_bandwidth_bytes_per_s = bounded(x[2], RATE_HEADROOM * b.memory_bandwidth_bytes_per_s);
    c.matmul_flops_per_s = bounded(x[3], RATE_HEADROOM * b.matmul_flops_per_s);
    c.attention_flops_per_s = bounded(x[4], RATE_HEADROOM * b.attention_flops_per_s);
    c.serial_fraction = 1.0 / (1.0 + (-x[5]).exp());
    p
}

fn pack(p: &GpuProfile, serial_fraction: f64) -> [f64; PARAMS] {
    let c = &p.cost;
    let s = serial_fraction.clamp(1e-3, 1.0 - 1e-3);
    [
        c.step_overhead_ns.max(1.0).ln(),
        c.per_sequence_ns.max(1.0).ln(),
        unbounded(
            c.memory_bandwidth_bytes_per_s,
            RATE_HEADROOM * c.memory_bandwidth_bytes_per_s,
        ),
        unbounded(c.matmul_flops_per_s, RATE_HEADROOM * c.matmul_flops_per_s),
        unbounded(
            c.attention_flops_per_s,
            RATE_HEADROOM * c.attention_flops_per_s,
        ),
        (s / (1.0 - s)).ln(),
    ]
}

/// Scale of the robust loss on log ratios: residuals well under 10% count quadratically, larger
/// ones only logarithmically, so one-time costs inside real runs (the first prefill of a new shape
/// bucket times cuBLASLt algorithms; a batch size's first decode captures its graph) cannot pull
/// the coefficients of the thousands of ordinary steps.
pub const ROBUST_SCALE: f64 = 0.1;

/// The objective: mean over step kinds of the mean Cauchy loss of the log ratio
/// (`s^2 ln(1 + (r / s)^2)`, s = `ROBUST_SCALE`).
fn loss(profile: &GpuProfile, samples: &[StepSample]) -> f64 {
    let mut sums = [0.0f64; 3];
    let mut counts = [0usize; 3];
    let scale2 = ROBUST_SCALE * ROBUST_SCALE;
    for s in samples {
        let k = s.kind as usize;
        let r = (profile.step_ns(&s.shape) / s.duration_ns).ln();
        sums[k] += scale2 * (r * r / scale2).ln_1p();
        counts[k] += 1;
    }
    let kinds = counts.iter().filter(|&&n| n > 0).count().max(1);
    sums.iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| s / n as f64)
        .sum::<f64>()
        / kinds as f64
}

/// Nelder-Mead minimisation (standard coefficients), deterministic.
fn nelder_mead(
    f: &dyn Fn(&[f64; PARAMS]) -> f64,
    start: [f64; PARAMS],
    step: f64,
    iterations: usize,
) -> ([f64; PARAMS], f64) {
    let mut simplex: Vec<([f64; PARAMS], f64)> = Vec::with_capacity(PARAMS + 1);
    simplex.push((start, f(&start)));
    for i in 0..PARAMS {
        let mut x = start;
        x[i] += step;
        simplex.push((x, f(&x)));
    }
    for _ in 0..iterations {
        simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (best, worst) = (simplex[0].1, simplex[PARAMS].1);
        if (worst - best).abs() <= 1e-12 * (1.0 + best.abs()) {
            break;
        }
        let mut centroid = [0.0; PARAMS];
        for (x, _) in &simplex[..PARAMS] {
            for i in 0..PARAMS {
                centroid[i] += x[i] / PARAMS as f64;
            }
        }
        let along = |t: f64| {
            let mut x = [0.0; PARAMS];
            for i in 0..PARAMS {
                x[i] = centroid[i] + t * (simplex[PARAMS].0[i] - centroid[i]);
            }
            x
        };
        let reflected = along(-1.0);
        let fr = f(&reflected);
        if fr < simplex[0].1 {
            let expanded = along(-2.0);
            let fe = f(&expanded);
            simplex[PARAMS] = if fe < fr {
                (expanded, fe)
            } else {
                (reflected, fr)
            };
        } else if fr < simplex[PARAMS - 1].1 {
            simplex[PARAMS] = (reflected, fr);
        } else {
            let contracted = if fr < simplex[PARAMS].1 {
                along(-0.5)
            } else {
                along(0.5)
            };
            let fc = f(&contracted);
            if fc < fr.min(simplex[PARAMS].1) {
                simplex[PARAMS] = (contracted, fc);
            } else {
                let x0 = simplex[0].0;
                for (x, fx) in simplex.iter_mut().skip(1) {
                    for i in 0..PARAMS {
                        x[i] = x0[i] + 0.5 * (x[i] - x0[i]);
                    }
                    *fx = f(x);
                }
            }
        }
    }
    simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
    simplex[0]
}

/// The step coefficients of `base` fitted to `samples` (all other fields kept).
pub fn fit_steps(base: &GpuProfile, samples: &[StepSample]) -> Result<GpuProfile, FitError> {
    if samples.is_empty() {
        return Err(FitError::NoSteps);
    }
    let objective = |x: &[f64; PARAMS]| {
        let l = loss(&unpack(base, x), samples);
        if l.is_finite() {
            l
        } else {
            f64::MAX
        }
    };
    // Three fixed starts for the serial fraction (the one coefficient the analytic profile has no
    // estimate of), each refined by two restarts of the simplex around its best point.
    let mut best: Option<([f64; PARAMS], f64)> = None;
    for serial in [0.05, 0.5, 0.95] {
        let mut point = (pack(base, serial), f64::MAX);
        for step in [0.5, 0.1, 0.02] {
            point = nelder_mead(&objective, point.0, step, 3000);
        }
        if best.as_ref().is_none_or(|b| point.1 < b.1) {
            best = Some(point);
        }
    }
    let (x, value) = best.expect("three starts ran");
    let profile = unpack(base, &x);
    if !value.is_finite() || value == f64::MAX || !profile.step_ns(&samples[0].shape).is_finite() {
        return Err(FitError::NotFinite);
    }
    Ok(profile)
}

/// A copy direction's bandwidth from its swaps: total bytes over total copy time net of the
/// latency (every swap of a run usually has the same size, so a latency/bandwidth regression is
/// degenerate; the latency stays the base profile's).
pub fn fit_channel(base: &CopyChannel, swaps: &[&SwapRecord]) -> Option<(CopyChannel, ChannelFit)> {
    let usable: Vec<&&SwapRecord> = swaps
        .iter()
        .filter(|s| s.bytes > 0 && s.end_ns > s.start_ns)
        .collect();
    if usable.is_empty() {
        return None;
    }
    let bytes: u64 = usable.iter().map(|s| s.bytes).sum();
    let copy_ns: f64 = usable
        .iter()
        .map(|s| ((s.end_ns - s.start_ns) as f64 - base.latency_ns as f64).max(1.0))
        .sum();
    let bandwidth = bytes as f64 / copy_ns * 1e9;
    Some((
        CopyChannel {
            latency_ns: base.latency_ns,
            bandwidth_bytes_per_s: bandwidth,
            step_memory_bytes_per_copied_byte: base.step_memory_bytes_per_copied_byte,
        },
        ChannelFit {
            swaps: usable.len(),
            bytes,
            bandwidth_bytes_per_s: bandwidth,
        },
    ))
}

/// One operating point of a copy-interference measurement (`djinn engine swap-bench
/// --interference-rounds N`): the copy rates beside a memory-bound step, and how much slower the
/// step ran than without them.
#[derive(Clone, Debug, PartialEq)]
pub struct InterferencePoint {
    pub label: String,
    pub h2d_bytes_per_s: f64,
    pub d2h_bytes_per_s: f64,
    /// Relative slowdown of the step: 0.05 = 5% slower.
    pub slowdown: f64,
}

/// The fitted copy costs (`CopyChannel::step_memory_bytes_per_copied_byte`) and, per point, the
/// slowdown the fitted profile predicts for a memory-bound step.
#[derive(Clone, Debug)]
pub struct InterferenceFit {
    pub h2d_cost: f64,
    pub d2h_cost: f64,
    pub predicted: Vec<(InterferencePoint, f64)>,
}

/// Least squares of `slowdown = (h2d_cost x h2d rate + d2h_cost x d2h rate) / memory bandwidth`
/// (the slowdown `GpuProfile::step_ns_beside_copies` gives a memory-bound step), with both costs
/// at least 0 and no intercept (no copy, no slowdown). A direction no point exercises keeps
/// `keep_h2d` / `keep_d2h`. `None` when no point has any copy traffic.
pub fn fit_copy_interference(
    points: &[InterferencePoint],
    memory_bandwidth_bytes_per_s: f64,
    keep_h2d: f64,
    keep_d2h: f64,
) -> Option<InterferenceFit> {
    let x: Vec<(f64, f64, f64)> = points
        .iter()
        .map(|p| {
            (
                p.h2d_bytes_per_s / memory_bandwidth_bytes_per_s,
                p.d2h_bytes_per_s / memory_bandwidth_bytes_per_s,
                p.slowdown,
            )
        })
        .collect();
    let (s11, s12, s22, s1y, s2y) = x.iter().fold((0.0, 0.0, 0.0, 0.0, 0.0), |a, &(u, v, y)| {
        (
            a.0 + u * u,
            a.1 + u * v,
            a.2 + v * v,
            a.3 + u * y,
            a.4 + v * y,
        )
    });
    let one = |sxx: f64, sxy: f64| if sxx > 0.0 { (sxy / sxx).max(0.0) } else { 0.0 };
    let (h2d_cost, d2h_cost) = match (s11 > 0.0, s22 > 0.0) {
        (false, false) => return None,
        (true, false) => (one(s11, s1y), keep_d2h),
        (false, true) => (keep_h2d, one(s22, s2y)),
        (true, true) => {
            let det = s11 * s22 - s12 * s12;
            let joint = if det > 1e-12 * s11 * s22 {
                Some(((s1y * s22 - s2y * s12) / det, (s2y * s11 - s1y * s12) / det))
            } else {
                None
            };
            match joint {
                Some((a, b)) if a >= 0.0 && b >= 0.0 => (a, b),
                // On the boundary: the better of the two one-direction fits.
                _ => {
                    let sse = |a: f64, b: f64| -> f64 {
                        x.iter().map(|&(u, v, y)| (y - a * u - b * v).powi(2)).sum()
                    };
                    let only_h2d = (one(s11, s1y), 0.0);
                    let only_d2h = (0.0, one(s22, s2y));
                    if sse(only_h2d.0, only_h2d.1) <= sse(only_d2h.0, only_d2h.1) {
                        only_h2d
                    } else {
                        only_d2h
                    }
                }
            }
        }
    };
    let predicted = points
        .iter()
        .zip(&x)
        .map(|(p, &(u, v, _))| (p.clone(), h2d_cost * u + d2h_cost * v))
        .collect();
    Some(InterferenceFit {
        h2d_cost,
        d2h_cost,
        predicted,
    })
}

/// One real run's records, named.
pub struct RunTraces {
    pub name: String,
    pub steps: Vec<StepRecord>,
    pub swaps: Vec<SwapRecord>,
}

/// Fits a profile to real runs: step coefficients, copy bandwidths, provenance with the in-sample
/// error (overall mean absolute percentage error) and leave-one-run-out errors.
pub fn fit_profile(
    base: &GpuProfile,
    runs: &[RunTraces],
    name: &str,
    source: &str,
    device: &str,
) -> Result<FitReport, FitError> {
    let samples: Vec<StepSample> = runs
        .iter()
        .flat_map(|r| step_samples(&r.name, &r.steps))
        .collect();
    let mut profile = fit_steps(base, &samples)?;
    let swaps_of = |direction: &str| -> Vec<&SwapRecord> {
        runs.iter()
            .flat_map(|r| r.swaps.iter())
            .filter(|s| s.direction == direction)
            .collect()
    };
    let host_to_device = fit_channel(&base.host_to_device, &swaps_of("in")).map(|(c, f)| {
        profile.host_to_device = c;
        f
    });
    let device_to_host = fit_channel(&base.device_to_host, &swaps_of("out")).map(|(c, f)| {
        profile.device_to_host = c;
        f
    });
    let fitted_errors = errors(&profile, &samples);
    let mut leave_one_run_out = BTreeMap::new();
    if runs.len() >= 2 {
        for held_out in runs {
            let train: Vec<StepSample> = samples
                .iter()
                .filter(|s| s.run != held_out.name)
                .cloned()
                .collect();
            let test: Vec<StepSample> = samples
                .iter()
                .filter(|s| s.run == held_out.name)
                .cloned()
                .collect();
            if train.is_empty() || test.is_empty() {
                continue;
            }
            let p = fit_steps(base, &train)?;
            leave_one_run_out.insert(held_out.name.clone(), errors(&p, &test));
        }
    }
    profile.name = name.to_string();
    profile.provenance = Provenance {
        kind: "fitted".into(),
        source: source.to_string(),
        fit_error: fitted_errors.get(&None).map(|e| e.mape),
        device: device.to_string(),
        driver: String::new(),
        commit: String::new(),
        fitted_from: None,
        validation: None,
    };
    Ok(FitReport {
        base_errors: errors(base, &samples),
        fitted_errors,
        leave_one_run_out,
        samples: samples.len(),
        profile,
        host_to_device,
        device_to_host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> GpuProfile {
        crate::load_profile("h100-llama2-7b").unwrap()
    }

    fn record(prefill_tokens: u32, context: u64, decode_batch: u32, decode_ctx: u64) -> StepRecord {
        let t = prefill_tokens as u64;
        StepRecord {
            prefill_tokens,
            prefill_sequences: u32::from(prefill_tokens > 0),
            prefill_attention_pairs: t * context + t * (t + 1) / 2,
            decode_batch,
            decode_context_tokens: decode_ctx,
            ..StepRecord::default()
        }
    }

    /// Steps timed by a known profile: decode batches, prefills on top of context, and mixed.
    fn synthetic_steps(truth: &GpuProfile) -> Vec<StepRecord> {
        let mut steps = Vec::new();
        for (i, batch) in [1u32, 2, 4, 8, 16, 24, 32, 48, 64].iter().enumerate() {
            for ctx in [256u64, 1024, 2048, 3072] {
                steps.push(record(0, 0, *batch, *batch as u64 * ctx));
                let prefill = 128 * (1 + i as u32);
                steps.push(record(prefill, ctx, 0, 0));
                steps.push(record(prefill, ctx / 2, *batch, *batch as u64 * ctx));
            }
        }
        for s in steps.iter_mut() {
            s.duration_ns = truth.step_ns(&StepShape::from_record(s)).round() as u64;
        }
        steps
    }

    #[test]
    fn recovers_a_known_profile_from_its_own_steps() {
        let mut truth = base();
        let c = &mut truth.cost;
        c.step_overhead_ns = 900_000.0;
        c.per_sequence_ns = 12_000.0;
        c.memory_bandwidth_bytes_per_s = 2.5e12;
        c.matmul_flops_per_s = 6.0e14;
        c.attention_flops_per_s = 2.0e14;
        c.serial_fraction = 0.4;
        let runs = [RunTraces {
            name: "synthetic".into(),
            steps: synthetic_steps(&truth),
            swaps: vec![],
        }];
        let report = fit_profile(&base(), &runs, "fit", "synthetic", "").unwrap();
        let fitted = &report.profile.cost;
        let close = |got: f64, want: f64, what: &str| {
            assert!(
                (got / want - 1.0).abs() < 0.03,
                "{what}: fitted {got}, true {want}"
            );
        };
        close(fitted.memory_bandwidth_bytes_per_s, 2.5e12, "bandwidth");
        close(fitted.matmul_flops_per_s, 6.0e14, "matmul");
        close(fitted.attention_flops_per_s, 2.0e14, "attention");
        close(fitted.serial_fraction, 0.4, "serial fraction");
        assert!(
            report.fitted_errors[&None].mape < 0.005,
            "{:?}",
            report.fitted_errors
        );
        // The analytic base is far off on these steps; the fit must be much better.
        assert!(report.base_errors[&None].mape > 10.0 * report.fitted_errors[&None].mape);
        assert_eq!(report.profile.provenance.kind, "fitted");
        // Fitted profiles are valid profiles.
        report
            .profile
            .validate(std::path::Path::new("fitted.json"))
            .unwrap();
    }

    #[test]
    fn the_fit_is_deterministic() {
        let mut truth = base();
        truth.cost.serial_fraction = 0.7;
        truth.cost.step_overhead_ns = 500_000.0;
        let runs = [
            RunTraces {
                name: "a".into(),
                steps: synthetic_steps(&truth),
                swaps: vec![],
            },
            RunTraces {
                name: "b".into(),
                steps: synthetic_steps(&truth)[..40].to_vec(),
                swaps: vec![],
            },
        ];
        let one = fit_profile(&base(), &runs, "fit", "s", "").unwrap();
        let two = fit_profile(&base(), &runs, "fit", "s", "").unwrap();
        assert_eq!(one.profile, two.profile);
        assert_eq!(one.leave_one_run_out.len(), 2);
    }

    #[test]
    fn channel_bandwidth_is_bytes_over_net_copy_time() {
        let swap = |bytes: u64, ns: u64| SwapRecord {
            direction: "in".into(),
            bytes,
            start_ns: 1_000,
            end_ns: 1_000 + ns,
            ..SwapRecord::default()
        };
        let base = CopyChannel {
            latency_ns: 10_000,
            bandwidth_bytes_per_s: 55e9,
            step_memory_bytes_per_copied_byte: 0.0,
        };
        let a = swap(1 << 30, 20_010_000);
        let b = swap(1 << 30, 20_010_000);
        let (channel, fit) = fit_channel(&base, &[&a, &b]).unwrap();
        assert_eq!(fit.swaps, 2);
        let want = (2u64 << 30) as f64 / 40_000_000.0 * 1e9;
        assert!((channel.bandwidth_bytes_per_s / want - 1.0).abs() < 1e-9);
        assert!(fit_channel(&base, &[]).is_none());
    }

    #[test]
    fn copy_interference_recovers_known_costs_and_stays_non_negative() {
        let bw = 2.5e12;
        let point = |h2d_gbps: f64, d2h_gbps: f64, cost_in: f64, cost_out: f64| InterferencePoint {
            label: format!("{h2d_gbps}/{d2h_gbps}"),
            h2d_bytes_per_s: h2d_gbps * 1e9,
            d2h_bytes_per_s: d2h_gbps * 1e9,
            slowdown: (cost_in * h2d_gbps + cost_out * d2h_gbps) * 1e9 / bw,
        };
        let points = [
            point(50.0, 0.0, 2.2, 0.7),
            point(0.0, 50.0, 2.2, 0.7),
            point(30.0, 48.0, 2.2, 0.7),
        ];
        let fit = fit_copy_interference(&points, bw, 9.0, 9.0).unwrap();
        assert!((fit.h2d_cost - 2.2).abs() < 1e-9, "{}", fit.h2d_cost);
        assert!((fit.d2h_cost - 0.7).abs() < 1e-9, "{}", fit.d2h_cost);
        for (p, predicted) in &fit.predicted {
            assert!((predicted - p.slowdown).abs() < 1e-12);
        }
        // Only swap-in measured: swap-out keeps the given cost.
        let fit = fit_copy_interference(&points[..1], bw, 9.0, 0.5).unwrap();
        assert!((fit.h2d_cost - 2.2).abs() < 1e-9);
        assert_eq!(fit.d2h_cost, 0.5);
        // Data that wants a negative swap-out cost gets 0, not a negative one.
        let odd = [point(50.0, 0.0, 2.0, 0.0), point(50.0, 50.0, 1.5, 0.0)];
        let fit = fit_copy_interference(&odd, bw, 0.0, 0.0).unwrap();
        assert!(fit.h2d_cost > 0.0 && fit.d2h_cost == 0.0);
        assert!(fit_copy_interference(&[point(0.0, 0.0, 1.0, 1.0)], bw, 0.0, 0.0).is_none());
    }

    #[test]
    fn no_steps_is_an_error() {
        let runs = [RunTraces {
            name: "empty".into(),
            steps: vec![StepRecord::default()],
            swaps: vec![],
        }];
        assert!(matches!(
            fit_profile(&base(), &runs, "f", "s", ""),
            Err(FitError::NoSteps)
        ));
    }
}
