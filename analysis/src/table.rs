//! Plain-text comparison tables (one row per policy).

use traces::RunSummary;

fn ms(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1e6)
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

/// One row per run: latency percentiles and the P99 decomposition (the row reads
/// "p99 = queue + restore + prefill + decode", inference being prefill + decode), then counts and
/// memory.
pub fn comparison_table(title: &str, rows: &[RunSummary]) -> String {
    let headers = [
        "policy",
        "p50 ms",
        "p99 ms",
        "= queue",
        "+ restore",
        "+ prefill",
        "+ decode",
        "done",
        "rejected",
        "swaps out",
        "restores",
        "drops",
        "preempt",
        "recomp tok",
        "gpu KV GiB",
        "host KV GiB",
        "alive peak",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let d = &r.decomposition_p99;
            vec![
                r.policy.clone(),
                ms(r.turn_latency.p50_ns),
                ms(r.turn_latency.p99_ns),
                ms(d.queue_wait_ns),
                ms(d.kv_restore_ns),
                ms(d.prefill_ns),
                ms(d.decode_ns),
                format!("{}/{}", r.turns_completed, r.turns_total),
                r.turns_rejected.to_string(),
                r.swaps_out.to_string(),
                r.restores.to_string(),
                r.drops.to_string(),
                r.preemptions.to_string(),
                r.tokens_recomputed.to_string(),
                gib(r.gpu_kv_bytes_peak),
                gib(r.host_kv_bytes_peak),
                r.agents_alive_peak.to_string(),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].len())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| -> String {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i == 0 {
                    format!("{:<w$}", v, w = widths[i])
                } else {
                    format!("{:>w$}", v, w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = String::new();
    out.push_str(title);
    out.push('\n');
    out.push_str(&line(headers.to_vec()));
    out.push('\n');
    out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
    out.push('\n');
    for c in &cells {
        out.push_str(&line(c.iter().map(|s| s.as_str()).collect()));
        out.push('\n');
    }
    out
}

/// A flat, spreadsheet-friendly row of a summary (one CSV row per run).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SummaryRow {
    pub workload: String,
    pub policy: String,
    pub agents: u32,
    pub seed: u64,
    pub turns_total: u64,
    pub turns_completed: u64,
    pub turns_rejected: u64,
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_mean: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p99: f64,
    pub p99_queue_wait_ms: f64,
    pub p99_kv_restore_ms: f64,
    pub p99_prefill_ms: f64,
    pub p99_decode_ms: f64,
    pub mean_queue_wait_ms: f64,
    pub mean_kv_restore_ms: f64,
    pub mean_prefill_ms: f64,
    pub mean_decode_ms: f64,
    pub swaps_out: u64,
    pub swaps_in: u64,
    pub restores: u64,
    pub drops: u64,
    /// Absent from rows written before preemptions were counted apart from drops.
    #[serde(default)]
    pub preemptions: u64,
    pub tokens_recomputed: u64,
    pub tokens_generated: u64,
    pub throughput_tokens_per_s: f64,
    pub gpu_kv_gib_peak: f64,
    pub host_kv_gib_peak: f64,
    pub agents_alive_peak: u32,
    pub slo_ms: f64,
    pub slo_attainment: f64,
    pub sim_time_s: f64,
    pub steps: u64,
}

impl From<&RunSummary> for SummaryRow {
    fn from(r: &RunSummary) -> Self {
        let ms = |ns: u64| ns as f64 / 1e6;
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        SummaryRow {
            workload: r.workload.clone(),
            policy: r.policy.clone(),
            agents: r.agents,
            seed: r.seed,
            turns_total: r.turns_total,
            turns_completed: r.turns_completed,
            turns_rejected: r.turns_rejected,
            latency_ms_p50: ms(r.turn_latency.p50_ns),
            latency_ms_p90: ms(r.turn_latency.p90_ns),
            latency_ms_p99: ms(r.turn_latency.p99_ns),
            latency_ms_mean: ms(r.turn_latency.mean_ns),
            ttft_ms_p50: ms(r.ttft.p50_ns),
            ttft_ms_p99: ms(r.ttft.p99_ns),
            p99_queue_wait_ms: ms(r.decomposition_p99.queue_wait_ns),
            p99_kv_restore_ms: ms(r.decomposition_p99.kv_restore_ns),
            p99_prefill_ms: ms(r.decomposition_p99.prefill_ns),
            p99_decode_ms: ms(r.decomposition_p99.decode_ns),
            mean_queue_wait_ms: ms(r.decomposition_mean.queue_wait_ns),
            mean_kv_restore_ms: ms(r.decomposition_mean.kv_restore_ns),
            mean_prefill_ms: ms(r.decomposition_mean.prefill_ns),
            mean_decode_ms: ms(r.decomposition_mean.decode_ns),
            swaps_out: r.swaps_out,
            swaps_in: r.swaps_in,
            restores: r.restores,
            drops: r.drops,
            preemptions: r.preemptions,
            tokens_recomputed: r.tokens_recomputed,
            tokens_generated: r.tokens_generated,
            throughput_tokens_per_s: r.throughput_tokens_per_s,
            gpu_kv_gib_peak: gib(r.gpu_kv_bytes_peak),
            host_kv_gib_peak: gib(r.host_kv_bytes_peak),
            agents_alive_peak: r.agents_alive_peak,
            slo_ms: ms(r.slo_ns),
            slo_attainment: r.slo_attainment,
            sim_time_s: r.sim_time_ns as f64 / 1e9,
            steps: r.steps,
        }
    }
}
