//! Planning a profiling grid: which step shapes to measure so that a fit from the grid alone
//! covers what workloads produce, within a time budget. A pure function of the model's limits,
//! the KV memory the card leaves, a step-time predictor (an analytic profile's `step_ns`) and the
//! budget, so it is unit-tested without an engine.
//!
//! Shapes: decode batch 1-256 x context 512 to the model's maximum (powers of two, the maximum
//! itself last); prefill chunks of 16 to 8,192 tokens on 0 to 100k cached tokens; mixed steps (a
//! chunk beside a decode batch); and swaps in both directions beside decode and prefill steps of
//! several sizes. Shapes that do not fit the KV memory are skipped with the reason. When the
//! budget is short, repetitions shrink first (down to `MIN_REPS`), then the fine shapes go (every
//! other point of each axis), then coarse ones from the most expensive down: each skip is named.

use traces::StepShape;

/// Fewest timed repetitions of a shape the plan keeps before dropping shapes.
pub const MIN_REPS: u32 = 3;

/// Per-shape fixed cost the predictor does not see (staging inputs, host bookkeeping), ns.
const SHAPE_OVERHEAD_NS: f64 = 2e6;

/// One step to measure. Decode sequences attend to `context` tokens each (their new token
/// included); a prefill chunk of `chunk` tokens is split evenly over `seqs` sequences (the
/// engine batches several agents' prompts into one chunk), each on `cached` tokens of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StepSpec {
    Decode {
        batch: u32,
        context: u32,
    },
    Prefill {
        chunk: u32,
        cached: u32,
        seqs: u32,
    },
    Mixed {
        chunk: u32,
        cached: u32,
        seqs: u32,
        batch: u32,
        context: u32,
    },
}

/// A shape of the grid: a step, and copies started right before it (tokens of KV swapped in and
/// out; 0 = a quiet step).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GridShape {
    pub step: StepSpec,
    pub swap_in_tokens: u32,
    pub swap_out_tokens: u32,
    /// 0 = coarse (kept longest under a short budget), 1 = fine.
    pub level: u8,
}

impl StepSpec {
    /// The shape the cost model sees.
    pub fn shape(&self) -> StepShape {
        let (chunk, cached, _, batch, context) = self.parts();
        let split = self.prefill_split();
        let c = cached as f64;
        let k = split.len() as f64;
        StepShape {
            prefill_tokens: chunk as f64,
            prefill_context_read_tokens: k * c + chunk as f64,
            prefill_attention_pairs: split
                .iter()
                .map(|&n| {
                    let n = n as f64;
                    n * c + n * (n + 1.0) / 2.0
                })
                .sum(),
            decode_sequences: batch as f64,
            decode_context_tokens: batch as f64 * context as f64,
            sequences: batch as f64 + k,
        }
    }

    /// (chunk, cached, prefill sequences, decode batch, decode context); zeros where absent.
    fn parts(&self) -> (u32, u32, u32, u32, u32) {
        match *self {
            StepSpec::Decode { batch, context } => (0, 0, 0, batch, context),
            StepSpec::Prefill {
                chunk,
                cached,
                seqs,
            } => (chunk, cached, seqs, 0, 0),
            StepSpec::Mixed {
                chunk,
                cached,
                seqs,
                batch,
                context,
            } => (chunk, cached, seqs, batch, context),
        }
    }

    /// Tokens of the chunk each prefill sequence takes (the first ones take the remainder).
    pub fn prefill_split(&self) -> Vec<u32> {
        let (chunk, _, seqs, _, _) = self.parts();
        if chunk == 0 {
            return Vec::new();
        }
        let k = seqs.clamp(1, chunk);
        (0..k)
            .map(|i| chunk / k + u32::from(i < chunk % k))
            .collect()
    }

    /// KV tokens the step's sequences hold.
    pub fn kv_tokens(&self) -> u64 {
        let (chunk, cached, seqs, batch, context) = self.parts();
        let prefill_seqs = if chunk > 0 { seqs.max(1) as u64 } else { 0 };
        chunk as u64 + prefill_seqs * cached as u64 + batch as u64 * context as u64
    }

    /// Longest sequence of the step, tokens.
    pub fn longest(&self) -> u32 {
        let (_, cached, _, _, context) = self.parts();
        let longest_chunk = self.prefill_split().first().copied().unwrap_or(0);
        if longest_chunk > 0 {
            (longest_chunk + cached).max(context)
        } else {
            context
        }
    }

    pub fn label(&self) -> String {
        let prefill = |chunk: u32, cached: u32, seqs: u32| {
            if seqs > 1 {
                format!("prefill {chunk} as {seqs} sequences on {cached} each")
            } else {
                format!("prefill {chunk} on {cached}")
            }
        };
        match *self {
            StepSpec::Decode { batch, context } => format!("decode {batch} x {context}"),
            StepSpec::Prefill {
                chunk,
                cached,
                seqs,
            } => prefill(chunk, cached, seqs),
            StepSpec::Mixed {
                chunk,
                cached,
                seqs,
                batch,
                context,
            } => format!(
                "mixed {} + decode {batch} x {context}",
                prefill(chunk, cached, seqs)
            ),
        }
    }
}

impl GridShape {
    pub fn label(&self) -> String {
        let mut s = self.step.label();
        if self.swap_in_tokens > 0 {
            s += &format!(" beside swap-in of {} tokens", self.swap_in_tokens);
        }
        if self.swap_out_tokens > 0 {
            s += &format!(" beside swap-out of {} tokens", self.swap_out_tokens);
        }
        s
    }

    /// KV tokens the step and its copies need on the device at once.
    pub fn kv_tokens(&self) -> u64 {
        self.step.kv_tokens() + self.swap_in_tokens as u64 + self.swap_out_tokens as u64
    }
}

/// What the plan depends on.
#[derive(Clone, Debug)]
pub struct GridLimits {
    /// The model's longest context, tokens.
    pub max_context: u32,
    /// KV tokens the device pool holds.
    pub kv_capacity_tokens: u64,
    /// Host pool tokens (swap sizes are capped by it).
    pub host_capacity_tokens: u64,
    /// Largest step the engine takes (tokens in one forward).
    pub max_step_tokens: u32,
    /// Largest decode batch the engine takes.
    pub max_batch: u32,
    pub warmup: u32,
    pub reps: u32,
    pub budget_s: f64,
    /// Nanoseconds a copy takes per KV token, host to device and device to host: a shape beside
    /// copies waits for them before its next repetition, so they count toward the budget.
    pub copy_ns_per_token: [f64; 2],
}

/// The planned grid.
#[derive(Clone, Debug, PartialEq)]
pub struct GridPlan {
    pub shapes: Vec<GridShape>,
    pub warmup: u32,
    pub reps: u32,
    /// Shapes left out, each with why.
    pub skipped: Vec<String>,
    /// Predicted seconds of the kept shapes.
    pub predicted_s: f64,
}

fn powers(from: u32, to: u32, factor: u32) -> Vec<u32> {
    let mut v = Vec::new();
    let mut x = from;
    while x <= to {
        v.push(x);
        match x.checked_mul(factor) {
            Some(next) => x = next,
            None => break,
        }
    }
    v
}

/// Every shape the grid would like, before memory and budget.
fn candidates(limits: &GridLimits) -> Vec<GridShape> {
    let quiet = |step, level| GridShape {
        step,
        swap_in_tokens: 0,
        swap_out_tokens: 0,
        level,
    };
    let mut out = Vec::new();
    // Decode: batch 1..256 (x2) x context 512..max (x2, and the maximum).
    let mut contexts = powers(512, limits.max_context, 2);
    if contexts.last() != Some(&limits.max_context) && limits.max_context >= 512 {
        contexts.push(limits.max_context);
    }
    if contexts.is_empty() {
        contexts.push(limits.max_context.max(1));
    }
    let last_ctx = contexts.len() - 1;
    for (bi, batch) in powers(1, 256, 2).into_iter().enumerate() {
        for (ci, &context) in contexts.iter().enumerate() {
            let coarse = bi % 2 == 0 && (ci % 2 == 0 || ci == last_ctx);
            out.push(quiet(
                StepSpec::Decode { batch, context },
                u8::from(!coarse),
            ));
        }
    }
    // Prefill: chunks 16..8192 (x2) on 0 and 1k..100k cached tokens (x4, and 100k), and on half
    // and three quarters of the model's window where those are new levels (a 4k model would
    // otherwise see only 0 and 1k cached tokens).
    let mut cached_levels = vec![0u32];
    cached_levels.extend(powers(1024, 65536, 4));
    cached_levels.push(100_000);
    for extra in [limits.max_context / 2, limits.max_context / 4 * 3] {
        let near = cached_levels
            .iter()
            .any(|&c| c > 0 && (extra as f64 / c as f64).ln().abs() < 1.25f64.ln());
        if extra >= 1024 && !near {
            cached_levels.push(extra);
        }
    }
    cached_levels.sort_unstable();
    for (ni, chunk) in powers(16, 8192, 2).into_iter().enumerate() {
        for (ki, &cached) in cached_levels.iter().enumerate() {
            let coarse = ni % 2 == 0 && ki % 2 == 0;
            let step = StepSpec::Prefill {
                chunk,
                cached,
                seqs: 1,
            };
            out.push(quiet(step, u8::from(!coarse)));
        }
    }
    // Chunks shared by several sequences, as a batch of agents' prompts is prefilled: the same
    // tokens through the GEMMs, less attention, more sequences.
    for chunk in [1024u32, 4096] {
        for seqs in [2u32, 4, 8] {
            for cached in [0u32, 1024] {
                let step = StepSpec::Prefill {
                    chunk,
                    cached,
                    seqs,
                };
                out.push(quiet(step, u8::from(seqs != 4 || cached != 0)));
            }
        }
    }
    // Mixed: a chunk beside a decode batch at 2k context (or the model's maximum, if shorter);
    // then a 1k chunk, whole or shared by four sequences, beside decode batches at short, middle
    // and (long-context models) a quarter-window context.
    let mid_context = limits.max_context.clamp(1, 2048);
    for (ni, chunk) in [64u32, 512, 2048].into_iter().enumerate() {
        for (bi, batch) in [4u32, 16, 64].into_iter().enumerate() {
            let step = StepSpec::Mixed {
                chunk,
                cached: mid_context / 2,
                seqs: 1,
                batch,
                context: mid_context,
            };
            out.push(quiet(step, u8::from(ni % 2 == 1 || bi % 2 == 1)));
        }
    }
    let mut mixed_contexts = vec![limits.max_context.clamp(1, 512), mid_context];
    if limits.max_context / 4 > mid_context {
        mixed_contexts.push(limits.max_context / 4);
    }
    for (ci, &context) in mixed_contexts.iter().enumerate() {
        for (seqs, cached) in [(1u32, mid_context / 4), (4, 0)] {
            for batch in [8u32, 32] {
                let step = StepSpec::Mixed {
                    chunk: 1024,
                    cached,
                    seqs,
                    batch,
                    context,
                };
                out.push(quiet(step, u8::from(ci != 0 || batch != 8)));
            }
        }
    }
    // Copies beside steps: both directions, two sizes, beside decode and prefill steps.
    let victims = [
        StepSpec::Decode {
            batch: 8,
            context: mid_context,
        },
        StepSpec::Decode {
            batch: 64,
            context: mid_context,
        },
        StepSpec::Prefill {
            chunk: 512,
            cached: 0,
            seqs: 1,
        },
        StepSpec::Prefill {
            chunk: 4096,
            cached: 0,
            seqs: 1,
        },
    ];
    for (vi, victim) in victims.into_iter().enumerate() {
        for (si, tokens) in [2048u32, 16384].into_iter().enumerate() {
            for (swap_in, swap_out) in [(tokens, 0), (0, tokens), (tokens, tokens)] {
                out.push(GridShape {
                    step: victim,
                    swap_in_tokens: swap_in,
                    swap_out_tokens: swap_out,
                    level: u8::from(vi % 2 == 1 || si == 1),
                });
            }
        }
    }
    out
}

/// Why a shape cannot run on this engine at all, if it cannot.
fn does_not_fit(shape: &GridShape, limits: &GridLimits) -> Option<String> {
    let step = &shape.step;
    if step.longest() > limits.max_context {
        return Some(format!(
            "longer than the model's {} tokens",
            limits.max_context
        ));
    }
    if shape.kv_tokens() > limits.kv_capacity_tokens {
        return Some(format!(
            "needs {} KV tokens, the pool holds {}",
            shape.kv_tokens(),
            limits.kv_capacity_tokens
        ));
    }
    let host = shape.swap_in_tokens as u64 + shape.swap_out_tokens as u64;
    if host > limits.host_capacity_tokens {
        return Some(format!(
            "copies {host} tokens, the host pool holds {}",
            limits.host_capacity_tokens
        ));
    }
    let (tokens, batch) = match *step {
        StepSpec::Decode { batch, .. } => (batch, batch),
        StepSpec::Prefill { chunk, seqs, .. } => (chunk, seqs.max(1)),
        StepSpec::Mixed {
            chunk, seqs, batch, ..
        } => (chunk + batch, batch + seqs.max(1)),
    };
    if tokens > limits.max_step_tokens || batch > limits.max_batch {
        return Some(format!(
            "{tokens} tokens / {batch} sequences exceed the engine's step limits ({} / {})",
            limits.max_step_tokens, limits.max_batch
        ));
    }
    None
}

/// Plans the grid. `predict_ns` gives a step's expected time (an analytic profile's `step_ns`,
/// scaled to the engine by a probe step).
pub fn plan_grid(limits: &GridLimits, predict_ns: &dyn Fn(&StepShape) -> f64) -> GridPlan {
    let mut skipped = Vec::new();
    let mut kept: Vec<(GridShape, f64)> = Vec::new();
    for shape in candidates(limits) {
        match does_not_fit(&shape, limits) {
            Some(why) => skipped.push(format!("{}: {why}", shape.label())),
            None => {
                let copies_ns = [shape.swap_in_tokens, shape.swap_out_tokens]
                    .iter()
                    .zip(limits.copy_ns_per_token)
                    .map(|(&tokens, ns)| tokens as f64 * ns.max(0.0))
                    .fold(0.0, f64::max);
                let step_ns = predict_ns(&shape.step.shape()).max(0.0);
                kept.push((shape, step_ns.max(copies_ns) + SHAPE_OVERHEAD_NS));
            }
        }
    }
    let budget_ns = limits.budget_s.max(0.0) * 1e9;
    let cost = |shapes: &[(GridShape, f64)], reps: u32| -> f64 {
        shapes
            .iter()
            .map(|(_, ns)| ns * (limits.warmup + reps) as f64)
            .sum()
    };
    let mut reps = limits.reps.max(1);
    while reps > MIN_REPS.min(limits.reps.max(1)) && cost(&kept, reps) > budget_ns {
        reps -= 1;
    }
    // Still over: drop fine shapes, then coarse ones, most expensive first within a level.
    if cost(&kept, reps) > budget_ns {
        let mut order: Vec<usize> = (0..kept.len()).collect();
        order.sort_by(|&a, &b| {
            kept[b]
                .0
                .level
                .cmp(&kept[a].0.level)
                .then(kept[b].1.total_cmp(&kept[a].1))
                .then(kept[a].0.cmp(&kept[b].0))
        });
        let mut total = cost(&kept, reps);
        let mut drop = vec![false; kept.len()];
        for i in order {
            if total <= budget_ns {
                break;
            }
            drop[i] = true;
            total -= kept[i].1 * (limits.warmup + reps) as f64;
            skipped.push(format!("{}: over the time budget", kept[i].0.label()));
        }
        kept = kept
            .into_iter()
            .zip(drop)
            .filter(|(_, d)| !d)
            .map(|(k, _)| k)
            .collect();
    }
    let predicted_s = cost(&kept, reps) / 1e9;
    GridPlan {
        shapes: kept.into_iter().map(|(s, _)| s).collect(),
        warmup: limits.warmup,
        reps,
        skipped,
        predicted_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-2-7B on an H100: 4k context, ~112k KV tokens (the analytic profile's pool).
    fn h100_llama2() -> (GridLimits, traces::GpuProfile) {
        let profile: traces::GpuProfile = serde_json::from_str(include_str!(
            "../../../../calibration/profiles/h100-llama2-7b.json"
        ))
        .unwrap();
        let limits = GridLimits {
            max_context: 4096,
            kv_capacity_tokens: 112_896,
            host_capacity_tokens: 1 << 20,
            max_step_tokens: 8192,
            max_batch: 256,
            warmup: 2,
            reps: 7,
            budget_s: 300.0,
            copy_ns_per_token: [
                profile.kv_bytes_per_token as f64 / profile.host_to_device.bandwidth_bytes_per_s
                    * 1e9,
                profile.kv_bytes_per_token as f64 / profile.device_to_host.bandwidth_bytes_per_s
                    * 1e9,
            ],
        };
        (limits, profile)
    }

    #[test]
    fn the_h100_grid_fits_five_minutes_and_covers_every_kind() {
        let (limits, p) = h100_llama2();
        let plan = plan_grid(&limits, &|s| p.step_ns(s));
        assert!(plan.predicted_s <= 300.0, "{}", plan.predicted_s);
        let has = |f: &dyn Fn(&GridShape) -> bool| plan.shapes.iter().any(f);
        assert!(has(&|s| matches!(
            s.step,
            StepSpec::Decode {
                batch: 1,
                context: 512
            }
        )));
        assert!(has(&|s| matches!(
            s.step,
            StepSpec::Decode { context: 4096, .. }
        )));
        assert!(has(&|s| matches!(
            s.step,
            StepSpec::Prefill {
                chunk: 16,
                cached: 0,
                seqs: 1
            }
        )));
        assert!(has(&|s| matches!(
            s.step,
            StepSpec::Prefill { chunk: 4096, .. }
        )));
        // An 8k chunk is longer than the 4k model: skipped, and said so.
        assert!(plan.skipped.iter().any(|s| s.starts_with("prefill 8192")));
        assert!(has(&|s| matches!(s.step, StepSpec::Mixed { .. })));
        // Chunks shared by several prompts, alone and beside a short-context decode batch; cached
        // levels inside the 4k window beyond 1k.
        assert!(has(&|s| matches!(
            s.step,
            StepSpec::Prefill { seqs: 4, .. }
        )));
        assert!(has(&|s| matches!(
            s.step,
            StepSpec::Mixed {
                seqs: 4,
                context: 512,
                ..
            }
        )));
        assert!(has(&|s| matches!(
            s.step,
            StepSpec::Prefill {
                cached: 2048,
                seqs: 1,
                ..
            }
        )));
        assert!(has(&|s| s.swap_in_tokens > 0 && s.swap_out_tokens == 0));
        assert!(has(&|s| s.swap_out_tokens > 0 && s.swap_in_tokens == 0));
        // Batch 256 at 4k context needs 1M KV tokens: skipped, and said so.
        assert!(!has(&|s| matches!(
            s.step,
            StepSpec::Decode {
                batch: 256,
                context: 4096
            }
        )));
        assert!(plan
            .skipped
            .iter()
            .any(|s| s.starts_with("decode 256 x 4096") && s.contains("KV tokens")));
        // 100k cached tokens do not fit a 4k model.
        assert!(plan.skipped.iter().any(|s| s.contains("on 100000")));
        assert_eq!(plan, plan_grid(&limits, &|s| p.step_ns(s)), "deterministic");
    }

    #[test]
    fn copies_beside_a_step_count_toward_the_budget() {
        let (mut limits, p) = h100_llama2();
        limits.budget_s = 1e6;
        let with = plan_grid(&limits, &|s| p.step_ns(s));
        limits.copy_ns_per_token = [0.0, 0.0];
        let without = plan_grid(&limits, &|s| p.step_ns(s));
        assert_eq!(with.shapes, without.shapes);
        // 16k tokens of llama2-7b KV are 8 GiB: ~0.16 s a copy at 55 GB/s, against a ~10 ms
        // step; the plan must see them.
        assert!(
            with.predicted_s > without.predicted_s + 5.0,
            "{} vs {}",
            with.predicted_s,
            without.predicted_s
        );
    }

    #[test]
    fn a_short_budget_cuts_reps_then_fine_shapes_and_says_so() {
        let (mut limits, p) = h100_llama2();
        let full = plan_grid(&limits, &|s| p.step_ns(s));
        limits.budget_s = 5.0;
        let short = plan_grid(&limits, &|s| p.step_ns(s));
        assert_eq!(short.reps, MIN_REPS);
        assert!(short.shapes.len() < full.shapes.len());
        assert!(short.predicted_s <= 5.0, "{}", short.predicted_s);
        assert!(short
            .skipped
            .iter()
            .any(|s| s.ends_with("over the time budget")));
        // Coarse shapes outlive fine ones: a larger share of them is kept.
        let share = |level: u8| {
            let count = |p: &GridPlan| p.shapes.iter().filter(|s| s.level == level).count();
            count(&short) as f64 / count(&full) as f64
        };
        assert!(share(0) > share(1), "coarse {} fine {}", share(0), share(1));
    }

    #[test]
    fn a_long_context_model_on_a_big_card_reaches_100k_cached() {
        let (mut limits, p) = h100_llama2();
        limits.max_context = 131_072;
        limits.kv_capacity_tokens = 400_000;
        limits.budget_s = 1e6;
        let plan = plan_grid(&limits, &|s| p.step_ns(s));
        assert!(plan.shapes.iter().any(|s| matches!(
            s.step,
            StepSpec::Prefill {
                cached: 100_000,
                ..
            }
        )));
        assert!(plan.shapes.iter().any(|s| matches!(
            s.step,
            StepSpec::Decode {
                context: 131_072,
                batch: 1
            }
        )));
        assert_eq!(plan.reps, limits.reps);
    }
}
