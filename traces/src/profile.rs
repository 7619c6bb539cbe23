//! GPU profiles (JSON): the cost model of the simulated GPU, with where its numbers came from.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::io::{parse_json, read_text, TraceError};

/// A copy channel (one direction of PCIe): `t = latency + bytes / bandwidth`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyChannel {
    pub latency_ns: u64,
    pub bandwidth_bytes_per_s: f64,
}

/// The step-time model, form `roofline-v1`:
///
/// ```text
/// memory_ns  = (weight_bytes + kv_bytes_per_token * (decode context tokens + prefill context tokens read))
///              / memory_bandwidth
/// compute_ns = flops_per_token * (prefill tokens + decode sequences) / matmul_flops
///              + attention_flops_per_pair * (prefill attention pairs + decode context tokens) / attention_flops
/// step_ns    = step_overhead_ns + per_sequence_ns * sequences + max(memory_ns, compute_ns)
/// ```
///
/// Decode is memory-bound (it reads all weights and every context's KV), prefill compute-bound;
/// chunked prefill mixed with decode pays the larger of the two, as a roofline does.
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
        if self.schema_version != crate::SCHEMA_VERSION {
            return Err(TraceError::invalid(
                path,
                "schema_version",
                format!(
                    "this build reads version {}, got {}",
                    crate::SCHEMA_VERSION,
                    self.schema_version
                ),
            ));
        }
        if self.cost.form != "roofline-v1" {
            return Err(TraceError::invalid(
                path,
                "cost.form",
                format!("unknown form `{}` (known: roofline-v1)", self.cost.form),
            ));
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
        positive(
            "host_to_device.bandwidth_bytes_per_s",
            self.host_to_device.bandwidth_bytes_per_s,
        )?;
        positive(
            "device_to_host.bandwidth_bytes_per_s",
            self.device_to_host.bandwidth_bytes_per_s,
        )?;
        Ok(())
    }
}
