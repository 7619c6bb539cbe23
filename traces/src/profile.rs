//! GPU profiles (JSON): the cost model of the simulated GPU, with where its numbers came from.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::correction::StepCorrections;
use crate::io::{parse_json, read_text, TraceError};

/// A copy channel (one direction of PCIe): `t = latency + bytes / bandwidth`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyChannel {
    pub latency_ns: u64,
    pub bandwidth_bytes_per_s: f64,
    /// What a copy of this channel costs a step that runs beside it: each copied byte takes this
    /// many bytes of the step's own memory traffic (`GpuProfile::step_ns_beside_copies`). On an
    /// H100 a byte the copy engine *writes* into HBM costs a memory-bound decode step about 2.2
    /// bytes (bus turnarounds), a byte it *reads* about 0.7 (docs/engine-swap.md).
    /// Absent in a file = 0 (copies are free to steps) and not written when 0, so older profiles
    /// and their outputs stay byte-identical.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub step_memory_bytes_per_copied_byte: f64,
}

/// The step-time model, form `roofline-v1` (with copies beside the step, `memory_ns` grows by
/// `GpuProfile::step_ns_beside_copies`'s stolen bytes):
///
/// ```text
/// memory_ns  = (weight_bytes + kv_bytes_per_token * (decode context tokens + prefill context tokens read))
///              / memory_bandwidth
/// compute_ns = flops_per_token * (prefill tokens + decode sequences) / matmul_flops
///              + attention_flops_per_pair * (prefill attention pairs + decode context tokens) / attention_flops
/// step_ns    = step_overhead_ns + per_sequence_ns * sequences + max(memory_ns, compute_ns)
///              + serial_fraction * min(memory_ns, compute_ns)
/// ```
///
/// Decode is memory-bound (it reads all weights and every context's KV), prefill compute-bound;
/// chunked prefill mixed with decode pays the larger of the two, as a roofline does, plus the
/// `serial_fraction` of the smaller one that real kernels do not overlap (0 = ideal roofline, the
/// analytic profiles; 1 = no overlap at all; fitted profiles measure it).
///
/// Form `roofline-table-v1` is the same roofline times a measured correction
/// (`correction::StepCorrections`), interpolated over the step's shape in log space.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostModel {
    pub form: String,
    pub step_overhead_ns: f64,
    pub per_sequence_ns: f64,
    pub memory_bandwidth_bytes_per_s: f64,
    pub matmul_flops_per_s: f64,
    pub attention_flops_per_s: f64,
    pub flops_per_token: f64,
    pub attention_flops_per_pair: f64,
    /// Share of the smaller of memory and compute time that does not overlap with the larger, in
    /// [0, 1]. Absent in a file = 0 (the ideal roofline), and not written when 0, so older
    /// profiles and their outputs stay byte-identical.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub serial_fraction: f64,
    /// The correction tables of form `roofline-table-v1` (absent, and not written, in
    /// `roofline-v1`, so older profiles and their outputs stay byte-identical).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrections: Option<StepCorrections>,
}

/// The step forms this build evaluates.
pub const COST_FORMS: [&str; 2] = ["roofline-v1", "roofline-table-v1"];

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// The shape of one engine step, as the cost model sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepShape {
    /// New tokens prefilled in this step (all prefilling sequences).
    pub prefill_tokens: f64,
    /// Context tokens the prefills read (each prefilling sequence's cached context plus its new
    /// tokens).
    pub prefill_context_read_tokens: f64,
    /// Prefill tokens x the context each attends to.
    pub prefill_attention_pairs: f64,
    /// Sequences decoding one token.
    pub decode_sequences: f64,
    /// Sum of the decode sequences' context lengths.
    pub decode_context_tokens: f64,
    /// Sequences in the step (prefilling + decoding).
    pub sequences: f64,
}

impl StepShape {
    /// The shape of a recorded step. steps.csv keeps only totals of the prefills, so the context
    /// they read is reconstructed from the attention pairs assuming the prefilling sequences
    /// split the new tokens evenly: exact for one prefilling sequence (the common case).
    pub fn from_record(step: &crate::StepRecord) -> Self {
        let tokens = step.prefill_tokens as f64;
        let seqs = step.prefill_sequences.max(1) as f64;
        let prefill_context_read_tokens = if step.prefill_tokens == 0 {
            0.0
        } else {
            let per_seq = tokens / seqs;
            // pairs = sum over sequences of (t * context + t (t + 1) / 2)
            let causal = seqs * per_seq * (per_seq + 1.0) / 2.0;
            let context_sum = ((step.prefill_attention_pairs as f64 - causal) / per_seq).max(0.0);
            context_sum + tokens
        };
        StepShape {
            prefill_tokens: tokens,
            prefill_context_read_tokens,
            prefill_attention_pairs: step.prefill_attention_pairs as f64,
            decode_sequences: step.decode_batch as f64,
            decode_context_tokens: step.decode_context_tokens as f64,
            sequences: (if step.prefill_tokens > 0 {
                step.prefill_sequences
            } else {
                0
            } + step.decode_batch) as f64,
        }
    }
}

/// Where a profile's numbers came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// "analytic" (from datasheet / measured ceilings) or "fitted" (from step traces).
    pub kind: String,
    pub source: String,
    /// Relative fit error (e.g. mean absolute percentage error) when fitted.
    #[serde(default)]
    pub fit_error: Option<f64>,
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub driver: String,
    #[serde(default)]
    pub commit: String,
    /// What a fitted profile was fitted from: the profiling grid's card, driver, engine commit
    /// and shapes, in one line (absent in older profiles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fitted_from: Option<String>,
    /// The held-out validation the profile achieved (absent: not validated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationSummary>,
}

/// A compact validation table: per workload and policy, the signed relative error of the
/// simulated P50 and P99 turn latency against the real run (`djinn calibrate validate-suite`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationSummary {
    /// What was validated against (suite, card, date-free description).
    pub against: String,
    pub cells: Vec<ValidationCell>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationCell {
    pub workload: String,
    pub policy: String,
    /// (sim - real) / real of the P50 and P99 turn latency.
    pub p50_error: f64,
    pub p99_error: f64,
}

impl ValidationSummary {
    /// Largest |P50| and |P99| error over the cells (0 when there is none).
    pub fn worst(&self) -> (f64, f64) {
        self.cells.iter().fold((0.0f64, 0.0f64), |(a, b), c| {
            (a.max(c.p50_error.abs()), b.max(c.p99_error.abs()))
        })
    }
}

impl Provenance {
    /// One or two lines telling a reader how far to trust a profile's numbers.
    pub fn trust_summary(&self) -> String {
        let origin = if self.kind == "fitted" {
            let card = if self.device.is_empty() {
                "an unnamed device"
            } else {
                self.device.as_str()
            };
            match &self.fitted_from {
                Some(from) => format!("fitted on {card} from {from}"),
                None => format!("fitted on {card}"),
            }
        } else {
            self.kind.clone()
        };
        match &self.validation {
            Some(v) if !v.cells.is_empty() => {
                let (p50, p99) = v.worst();
                format!(
                    "{origin}; validated: P50 within {:.1}%, P99 within {:.1}% on {} runs ({})",
                    100.0 * p50,
                    100.0 * p99,
                    v.cells.len(),
                    v.against
                )
            }
            _ => format!("{origin}: not validated"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuProfile {
    pub schema_version: u32,
    pub name: String,
    pub gpu_name: String,
    pub gpu_memory_bytes: u64,
    pub model_name: String,
    pub weight_bytes: u64,
    pub kv_bytes_per_token: u64,
    pub max_context_tokens: u32,
    /// Activation / workspace memory kept out of the KV pool.
    pub workspace_reserve_bytes: u64,
    pub cost: CostModel,
    pub host_to_device: CopyChannel,
    pub device_to_host: CopyChannel,
    pub provenance: Provenance,
}

impl GpuProfile {
    /// The time of one step of this shape, in nanoseconds (unrounded), by the cost form.
    pub fn step_ns(&self, shape: &StepShape) -> f64 {
        let (memory_ns, compute_ns) = self.memory_and_compute_ns(shape);
        self.corrected(shape, self.combine(shape, memory_ns, compute_ns))
    }

    /// The roofline's time times the correction table's factor (form `roofline-table-v1`);
    /// `roofline-v1` returns it untouched.
    fn corrected(&self, shape: &StepShape, roofline_ns: f64) -> f64 {
        match &self.cost.corrections {
            None => roofline_ns,
            Some(c) => roofline_ns * c.factor(shape),
        }
    }

    /// The time of one step that starts while copies are queued: the host-to-device channel stays
    /// busy for `h2d_busy_ns` from the step's start, the device-to-host one for `d2h_busy_ns`.
    /// The bytes each channel copies during the step (as long as the quiet step lasts, at most)
    /// take `step_memory_bytes_per_copied_byte` times as many bytes from the step's memory time;
    /// compute is untouched, so a compute-bound prefill hardly notices while a memory-bound decode
    /// step slows by `cost x copy rate / memory bandwidth`. Channels with a zero cost (every
    /// analytic profile) give exactly `step_ns`.
    pub fn step_ns_beside_copies(
        &self,
        shape: &StepShape,
        h2d_busy_ns: f64,
        d2h_busy_ns: f64,
    ) -> f64 {
        let (memory_ns, compute_ns) = self.memory_and_compute_ns(shape);
        let quiet_ns = self.combine(shape, memory_ns, compute_ns);
        let stolen_bytes: f64 = [
            (&self.host_to_device, h2d_busy_ns),
            (&self.device_to_host, d2h_busy_ns),
        ]
        .iter()
        .filter(|(ch, busy)| ch.step_memory_bytes_per_copied_byte > 0.0 && *busy > 0.0)
        .map(|(ch, busy)| {
            ch.step_memory_bytes_per_copied_byte * ch.bandwidth_bytes_per_s * busy.min(quiet_ns)
                / 1e9
        })
        .sum();
        if stolen_bytes == 0.0 {
            return self.corrected(shape, quiet_ns);
        }
        let stolen_ns = stolen_bytes / self.cost.memory_bandwidth_bytes_per_s * 1e9;
        self.corrected(
            shape,
            self.combine(shape, memory_ns + stolen_ns, compute_ns),
        )
    }

    fn memory_and_compute_ns(&self, shape: &StepShape) -> (f64, f64) {
        let c = &self.cost;
        let memory_ns = (self.weight_bytes as f64
            + self.kv_bytes_per_token as f64
                * (shape.decode_context_tokens + shape.prefill_context_read_tokens))
            / c.memory_bandwidth_bytes_per_s
            * 1e9;
        let compute_ns = c.flops_per_token * (shape.prefill_tokens + shape.decode_sequences)
            / c.matmul_flops_per_s
            * 1e9
            + c.attention_flops_per_pair
                * (shape.prefill_attention_pairs + shape.decode_context_tokens)
                / c.attention_flops_per_s
                * 1e9;
        (memory_ns, compute_ns)
    }

    fn combine(&self, shape: &StepShape, memory_ns: f64, compute_ns: f64) -> f64 {
        let c = &self.cost;
        let step =
            c.step_overhead_ns + c.per_sequence_ns * shape.sequences + memory_ns.max(compute_ns);
        if c.serial_fraction == 0.0 {
            step
        } else {
            step + c.serial_fraction * memory_ns.min(compute_ns)
        }
    }

    pub fn from_json_str(path: &Path, text: &str) -> Result<Self, TraceError> {
        let profile: GpuProfile = parse_json(path, text)?;
        profile.validate(path)?;
        Ok(profile)
    }

    pub fn read(path: &Path) -> Result<Self, TraceError> {
        let text = read_text(path)?;
        Self::from_json_str(path, &text)
    }

    pub fn validate(&self, path: &Path) -> Result<(), TraceError> {
        let positive = |field: &str, v: f64| -> Result<(), TraceError> {
            if !v.is_finite() || v <= 0.0 {
                return Err(TraceError::invalid(
                    path,
                    field,
                    format!("must be a finite number > 0, got {v}"),
                ));
            }
            Ok(())
        };
        let non_negative = |field: &str, v: f64| -> Result<(), TraceError> {
            if !v.is_finite() || v < 0.0 {
                return Err(TraceError::invalid(
                    path,
                    field,
                    format!("must be a finite number >= 0, got {v}"),
                ));
            }
            Ok(())
        };
        crate::check_schema_version(path, self.schema_version)?;
        match (self.cost.form.as_str(), &self.cost.corrections) {
            ("roofline-v1", None) => {}
            ("roofline-v1", Some(_)) => {
                return Err(TraceError::invalid(
                    path,
                    "cost.corrections",
                    "form roofline-v1 has no correction tables (use form roofline-table-v1)",
                ))
            }
            ("roofline-table-v1", Some(c)) => c.validate(path, "cost.corrections")?,
            ("roofline-table-v1", None) => {
                return Err(TraceError::invalid(
                    path,
                    "cost.corrections",
                    "missing: form roofline-table-v1 needs its correction tables",
                ))
            }
            (other, _) => {
                return Err(TraceError::invalid(
                    path,
                    "cost.form",
                    format!("unknown form `{other}` (known: {})", COST_FORMS.join(", ")),
                ))
            }
        }
        positive("gpu_memory_bytes", self.gpu_memory_bytes as f64)?;
        positive("kv_bytes_per_token", self.kv_bytes_per_token as f64)?;
        positive("max_context_tokens", self.max_context_tokens as f64)?;
        if self.weight_bytes + self.workspace_reserve_bytes >= self.gpu_memory_bytes {
            return Err(TraceError::invalid(
                path,
                "weight_bytes",
                format!(
                    "weights ({}) plus workspace reserve ({}) leave no room in GPU memory ({})",
                    self.weight_bytes, self.workspace_reserve_bytes, self.gpu_memory_bytes
                ),
            ));
        }
        let c = &self.cost;
        non_negative("cost.step_overhead_ns", c.step_overhead_ns)?;
        non_negative("cost.per_sequence_ns", c.per_sequence_ns)?;
        positive(
            "cost.memory_bandwidth_bytes_per_s",
            c.memory_bandwidth_bytes_per_s,
        )?;
        positive("cost.matmul_flops_per_s", c.matmul_flops_per_s)?;
        positive("cost.attention_flops_per_s", c.attention_flops_per_s)?;
        non_negative("cost.flops_per_token", c.flops_per_token)?;
        non_negative("cost.attention_flops_per_pair", c.attention_flops_per_pair)?;
        if !(c.serial_fraction.is_finite() && (0.0..=1.0).contains(&c.serial_fraction)) {
            return Err(TraceError::invalid(
                path,
                "cost.serial_fraction",
                format!("must be a number in [0, 1], got {}", c.serial_fraction),
            ));
        }
        positive(
            "host_to_device.bandwidth_bytes_per_s",
            self.host_to_device.bandwidth_bytes_per_s,
        )?;
        positive(
            "device_to_host.bandwidth_bytes_per_s",
            self.device_to_host.bandwidth_bytes_per_s,
        )?;
        for (field, ch) in [
            ("host_to_device", &self.host_to_device),
            ("device_to_host", &self.device_to_host),
        ] {
            // Above ~100 a copy of a few GB/s would stop a memory-bound step: not a card, a typo.
            let v = ch.step_memory_bytes_per_copied_byte;
            if !(v.is_finite() && (0.0..=100.0).contains(&v)) {
                return Err(TraceError::invalid(
                    path,
                    format!("{field}.step_memory_bytes_per_copied_byte"),
                    format!("must be a number in [0, 100], got {v}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> GpuProfile {
        GpuProfile {
            schema_version: crate::SCHEMA_VERSION,
            name: "t".into(),
            gpu_name: "t".into(),
            gpu_memory_bytes: 80 << 30,
            model_name: "m".into(),
            weight_bytes: 1_000_000_000,
            kv_bytes_per_token: 1_000,
            max_context_tokens: 4096,
            workspace_reserve_bytes: 0,
            cost: CostModel {
                form: "roofline-v1".into(),
                step_overhead_ns: 100.0,
                per_sequence_ns: 10.0,
                memory_bandwidth_bytes_per_s: 1e12,
                matmul_flops_per_s: 1e12,
                attention_flops_per_s: 1e12,
                flops_per_token: 1e6,
                attention_flops_per_pair: 1e3,
                serial_fraction: 0.0,
                corrections: None,
            },
            host_to_device: CopyChannel {
                latency_ns: 0,
                bandwidth_bytes_per_s: 1e9,
                step_memory_bytes_per_copied_byte: 0.0,
            },
            device_to_host: CopyChannel {
                latency_ns: 0,
                bandwidth_bytes_per_s: 1e9,
                step_memory_bytes_per_copied_byte: 0.0,
            },
            provenance: Provenance {
                kind: "analytic".into(),
                source: String::new(),
                fit_error: None,
                device: String::new(),
                driver: String::new(),
                commit: String::new(),
                fitted_from: None,
                validation: None,
            },
        }
    }

    #[test]
    fn serial_fraction_adds_the_share_of_the_smaller_term_that_does_not_overlap() {
        // One decode sequence at context 1,000: memory 1e9 + 1e6 bytes at 1e12 B/s = 1,001,000 ns;
        // compute 1e6 flops + 1e6 attention flops at 1e12/s = 2,000 ns.
        let shape = StepShape {
            decode_sequences: 1.0,
            decode_context_tokens: 1_000.0,
            sequences: 1.0,
            ..StepShape::default()
        };
        let mut p = profile();
        let close = |got: f64, want: f64| assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        close(p.step_ns(&shape), 100.0 + 10.0 + 1_001_000.0);
        p.cost.serial_fraction = 1.0;
        close(p.step_ns(&shape), 100.0 + 10.0 + 1_001_000.0 + 2_000.0);
        p.cost.serial_fraction = 0.5;
        close(p.step_ns(&shape), 100.0 + 10.0 + 1_001_000.0 + 1_000.0);
    }

    #[test]
    fn copies_beside_a_step_take_memory_time_only_while_they_run() {
        // The decode step above: 1,001,110 ns quiet, memory-bound. Copies at 1e9 B/s (the test
        // profile's channels); a written byte costs 2 memory bytes, a read byte 0.5.
        let decode = StepShape {
            decode_sequences: 1.0,
            decode_context_tokens: 1_000.0,
            sequences: 1.0,
            ..StepShape::default()
        };
        let mut p = profile();
        let quiet = p.step_ns(&decode);
        let close = |got: f64, want: f64| assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // Free copies (every analytic profile): exactly the quiet step, whatever is queued.
        close(p.step_ns_beside_copies(&decode, 5e6, 5e6), quiet);
        p.host_to_device.step_memory_bytes_per_copied_byte = 2.0;
        p.device_to_host.step_memory_bytes_per_copied_byte = 0.5;
        close(p.step_ns_beside_copies(&decode, 0.0, 0.0), quiet);
        // Both channels busy the whole step: (2 + 0.5) x 1e9 B/s x quiet / 1e12 B/s more memory time.
        close(
            p.step_ns_beside_copies(&decode, 1e9, 1e9),
            quiet + 2.5e-3 * quiet,
        );
        // A swap-in that ends 100 us into the step steals only 100 us of copying.
        close(
            p.step_ns_beside_copies(&decode, 100_000.0, 0.0),
            quiet + 2.0 * 1e9 * 1e-4 / 1e12 * 1e9,
        );
        // A compute-bound step hides the stolen memory time under its compute.
        let prefill = StepShape {
            prefill_tokens: 4_000_000.0,
            prefill_context_read_tokens: 4_000_000.0,
            sequences: 1.0,
            ..StepShape::default()
        };
        close(
            p.step_ns_beside_copies(&prefill, 1e12, 1e12),
            p.step_ns(&prefill),
        );
        p.host_to_device.step_memory_bytes_per_copied_byte = 101.0;
        let err = p.validate(Path::new("p.json")).unwrap_err().to_string();
        assert!(
            err.contains("host_to_device.step_memory_bytes_per_copied_byte"),
            "{err}"
        );
        // Absent in a file means 0, and 0 is not written back.
        let text = serde_json::to_string(&profile()).unwrap();
        assert!(!text.contains("step_memory_bytes_per_copied_byte"));
    }

    #[test]
    fn serial_fraction_outside_0_1_is_named() {
        let mut p = profile();
        p.cost.serial_fraction = 1.5;
        let err = p.validate(Path::new("p.json")).unwrap_err().to_string();
        assert!(err.contains("cost.serial_fraction"), "{err}");
        // Absent in a file means 0, and 0 is not written back.
        let text = serde_json::to_string(&profile()).unwrap();
        assert!(!text.contains("serial_fraction"));
        let back: GpuProfile = serde_json::from_str(&text).unwrap();
        assert_eq!(back.cost.serial_fraction, 0.0);
    }

    #[test]
    fn a_recorded_prefill_step_gives_back_the_context_it_read() {
        // 100 new tokens on top of 400 cached: pairs = 100 * 400 + 100 * 101 / 2.
        let step = crate::StepRecord {
            prefill_tokens: 100,
            prefill_sequences: 1,
            prefill_attention_pairs: 100 * 400 + 5050,
            ..Default::default()
        };
        let shape = StepShape::from_record(&step);
        assert_eq!(shape.prefill_context_read_tokens, 500.0);
        assert_eq!(shape.sequences, 1.0);
    }
}
