//! Correctness checks of the CUDA forward that need a GPU (run by `djinn engine check ...` and the
//! `cuda_*` tests on the GPU machine): CUDA against a reference backend (the CPU one) on the same
//! weights, and self-consistency of the paged machinery (prefill-then-decode vs one prefill, batched
//! vs single decode, graph replay vs eager launches).

use serde::Serialize;

use crate::batch::{Logits, PagedModel, SeqStep};
use crate::cuda::{CudaError, CudaModel};

/// Logit agreement of one step.
#[derive(Clone, Debug, Serialize)]
pub struct StepDiff {
    pub step: usize,
    pub max_abs_diff: f32,
    /// Largest |logit| of the reference in this step (the scale the tolerance is relative to).
    pub ref_max_abs: f32,
    pub rel_l2: f64,
    /// Rows whose argmax differs between the two.
    pub argmax_mismatches: usize,
    /// Of those, rows where the reference's top-2 gap is within the tolerance (a legitimate tie).
    pub argmax_near_ties: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    pub steps: Vec<StepDiff>,
    pub tolerance_rel: f32,
    pub greedy_steps_identical: usize,
    pub worst_max_abs_diff: f32,
    pub worst_rel_l2: f64,
    pub passed: bool,
}

/// Compares two logit sets: max |a - b|, relative L2 and argmax.
pub fn diff_logits(
    step: usize,
    candidate: &Logits,
    reference: &Logits,
    tolerance_rel: f32,
) -> StepDiff {
    assert_eq!(
        (candidate.rows, candidate.vocab),
        (reference.rows, reference.vocab)
    );
    let mut max_abs_diff = 0f32;
    let mut ref_max_abs = 0f32;
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in candidate.data.iter().zip(&reference.data) {
        let d = if a.is_finite() {
            (a - b).abs()
        } else {
            f32::INFINITY
        };
        max_abs_diff = max_abs_diff.max(d);
        ref_max_abs = ref_max_abs.max(b.abs());
        num += (d as f64) * (d as f64);
        den += (*b as f64) * (*b as f64);
    }
    let tol = tolerance_rel * ref_max_abs.max(1.0);
    let (mut mismatches, mut near_ties) = (0, 0);
    for row in 0..reference.rows {
        let (ca, ra) = (candidate.argmax(row), reference.argmax(row));
        if ca != ra {
            mismatches += 1;
            let r = reference.row(row);
            if (r[ra as usize] - r[ca as usize]).abs() <= 2.0 * tol {
                near_ties += 1;
            }
        }
    }
    StepDiff {
        step,
        max_abs_diff,
        ref_max_abs,
        rel_l2: (num / den.max(1e-30)).sqrt(),
        argmax_mismatches: mismatches,
        argmax_near_ties: near_ties,
    }
}

/// Runs the same scripted multi-sequence session on `candidate` and `reference` and compares the
/// logits of every step. Session: three sequences with paged, interleaved block tables; a batched
/// prefill of different prompt lengths; a mixed step (two decodes + a later turn of 17 tokens on
/// top of cached context); then `decode_steps` batched greedy decode steps. Both models are fed the
/// reference's greedy tokens (so every step compares logits on identical inputs); the greedy streams
/// are identical for as long as no argmax differs.
pub fn compare_backends<A: PagedModel, B: PagedModel>(
    candidate: &mut A,
    reference: &mut B,
    vocab: usize,
    decode_steps: usize,
    tolerance_rel: f32,
) -> Result<CompareReport, String> {
    let bs = candidate.block_size_tokens();
    if reference.block_size_tokens() != bs {
        return Err(format!(
            "block sizes differ: candidate {bs}, reference {}",
            reference.block_size_tokens()
        ));
    }
    let prompt_lens = [23usize, 40, 5];
    let later_turn = 17usize;
    let max_len = prompt_lens.iter().max().unwrap() + later_turn + decode_steps + 2;
    let blocks_per_seq = max_len.div_ceil(bs);
    let nseq = prompt_lens.len();
    let pool_blocks = candidate.num_blocks().min(reference.num_blocks());
    if nseq * blocks_per_seq > pool_blocks {
        return Err(format!(
            "the check needs {} KV blocks; the pools have {pool_blocks}",
            nseq * blocks_per_seq
        ));
    }
    // Interleaved tables (sequence i uses blocks i, i + 3, i + 6, ... reversed) so that logical
    // order and pool order differ.
    let tables: Vec<Vec<u32>> = (0..nseq)
        .map(|i| {
            (0..blocks_per_seq)
                .rev()
                .map(|j| (j * nseq + i) as u32)
                .collect()
        })
        .collect();
    let token = |seq: usize, i: usize| ((seq * 131 + i * 29 + 7) % vocab) as u32;
    let prompts: Vec<Vec<u32>> = prompt_lens
        .iter()
        .enumerate()
        .map(|(s, &n)| (0..n).map(|i| token(s, i)).collect())
        .collect();

    let mut steps = Vec::new();
    let mut greedy_identical = 0usize;
    let mut diverged = false;
    let mut run = |step_index: usize,
                   batch: &[SeqStep<'_>],
                   steps: &mut Vec<StepDiff>|
     -> Result<Vec<u32>, String> {
        let a = candidate
            .forward(batch)
            .map_err(|e| format!("candidate step {step_index}: {e}"))?;
        let b = reference
            .forward(batch)
            .map_err(|e| format!("reference step {step_index}: {e}"))?;
        let d = diff_logits(step_index, &a, &b, tolerance_rel);
        let next: Vec<u32> = (0..b.rows).map(|r| b.argmax(r)).collect();
        steps.push(d);
        Ok(next)
    };

    // Step 0: batched prefill of three prompts.
    let batch: Vec<SeqStep<'_>> = (0..nseq)
        .map(|s| SeqStep {
            block_table: &tables[s],
            context_len: 0,
            tokens: &prompts[s],
        })
        .collect();
    let mut next = run(0, &batch, &mut steps)?;
    let mut lens: Vec<usize> = prompt_lens.to_vec();
    // Step 1: sequences 0 and 1 decode, sequence 2 gets a later turn on top of its cached prompt.
    let turn: Vec<u32> = (0..later_turn).map(|i| token(9, i)).collect();
    let inputs: Vec<Vec<u32>> = vec![vec![next[0]], vec![next[1]], turn.clone()];
    let batch: Vec<SeqStep<'_>> = (0..nseq)
        .map(|s| SeqStep {
            block_table: &tables[s],
            context_len: lens[s],
            tokens: &inputs[s],
        })
        .collect();
    next = run(1, &batch, &mut steps)?;
    for (s, input) in inputs.iter().enumerate() {
        lens[s] += input.len();
    }
    // Batched greedy decode.
    for step in 0..decode_steps {
        let inputs: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let batch: Vec<SeqStep<'_>> = (0..nseq)
            .map(|s| SeqStep {
                block_table: &tables[s],
                context_len: lens[s],
                tokens: &inputs[s],
            })
            .collect();
        next = run(2 + step, &batch, &mut steps)?;
        for len in lens.iter_mut() {
            *len += 1;
        }
        let last = steps.last().unwrap();
        if !diverged && last.argmax_mismatches == 0 {
            greedy_identical += 1;
        } else {
            diverged = true;
        }
    }
    let worst_max_abs_diff = steps.iter().map(|d| d.max_abs_diff).fold(0f32, f32::max);
    let worst_rel_l2 = steps.iter().map(|d| d.rel_l2).fold(0f64, f64::max);
    let within = steps.iter().all(|d| {
        d.max_abs_diff.is_finite() && d.max_abs_diff <= tolerance_rel * d.ref_max_abs.max(1.0)
    });
    let ties_only = steps
        .iter()
        .all(|d| d.argmax_mismatches == d.argmax_near_ties);
    Ok(CompareReport {
        passed: within && ties_only,
        steps,
        tolerance_rel,
        greedy_steps_identical: greedy_identical,
        worst_max_abs_diff,
        worst_rel_l2,
    })
}

type Results = Vec<(String, f32, bool)>;

/// The prompt and block tables the consistency checks share: a 77-token prompt (off every tile and
/// block boundary) cached in three sequences' blocks, and three next tokens.
struct Fixture {
    vocab: usize,
    bs: usize,
    n: usize,
    prompt: Vec<u32>,
    blocks: usize,
    table_a: Vec<u32>,
    table_b: Vec<u32>,
    table_c: Vec<u32>,
    next: [[u32; 1]; 3],
    tolerance_rel: f32,
}

impl Fixture {
    fn new(model: &CudaModel, tolerance_rel: f32) -> Fixture {
        let vocab = model.config.vocab_size;
        let bs = model.options.block_size_tokens;
        let n = 77usize;
        let blocks = (n + 8).div_ceil(bs);
        Fixture {
            vocab,
            bs,
            n,
            prompt: (0..n).map(|i| ((i * 104729 + 13) % vocab) as u32).collect(),
            blocks,
            table_a: (0..blocks as u32).collect(),
            table_b: (blocks as u32..2 * blocks as u32).rev().collect(),
            table_c: (2 * blocks as u32..3 * blocks as u32).collect(),
            next: [[5u32], [17u32], [99u32 % vocab as u32]],
            tolerance_rel,
        }
    }

    /// Records whether `a` matches `b` within the tolerance (argmax differences only at ties).
    fn record(&self, name: &str, a: &Logits, b: &Logits, results: &mut Results) {
        let d = diff_logits(0, a, b, self.tolerance_rel);
        let ok = d.max_abs_diff <= self.tolerance_rel * d.ref_max_abs.max(1.0)
            && d.argmax_mismatches == d.argmax_near_ties;
        results.push((name.to_string(), d.max_abs_diff, ok));
    }
}

/// Self-consistency of the paged forward on one model (any size, e.g. the random 7B):
/// (1) a prompt prefilled at once vs prefilled in two chunks (later turn) vs prefix + token-by-token
/// decode give the same last-token logits; (2) a batch of decodes equals each decoded alone;
/// (3) graph replay equals eager launches; then the pruned last layer against the whole one,
/// decode attention per KV head against per query head (grouped-query models) and,
/// on a long prompt, each optional path against its reference path, and decode batches on the
/// multi-row GEMV against cuBLAS. Returns a list of (check,
/// max |diff|, passed).
pub fn self_consistency(model: &mut CudaModel, tolerance_rel: f32) -> Result<Results, CudaError> {
    let fx = Fixture::new(model, tolerance_rel);
    let mut results = Vec::new();
    short_prompt_checks(model, &fx, &mut results)?;
    pruned_last_layer_checks(model, &fx, &mut results)?;
    decode_attention_checks(model, &fx, &mut results)?;
    long_prompt_checks(model, &fx, &mut results)?;
    // Last: these prompts overwrite the fixture's blocks.
    let batches: Vec<usize> = [2, 3, 8]
        .into_iter()
        .filter(|&b| super::batch_gemv::decode_check_fits(model, b))
        .collect();
    eprintln!("consistency: multi-row GEMV vs cuBLAS, decode batches {batches:?}");
    results.extend(super::batch_gemv::decode_checks(
        model,
        &batches,
        tolerance_rel,
    )?);
    Ok(results)
}

fn short_prompt_checks(
    model: &mut CudaModel,
    fx: &Fixture,
    results: &mut Results,
) -> Result<(), CudaError> {
    let Fixture {
        vocab,
        n,
        ref prompt,
        ref table_a,
        ref table_b,
        ref table_c,
        ref next,
        ..
    } = *fx;
    let record =
        |name: &str, a: &Logits, b: &Logits, results: &mut Results| fx.record(name, a, b, results);
    eprintln!("consistency: one-shot prefill of {n} tokens");
    let one_shot = model.forward_logits(&[SeqStep {
        block_table: &table_a,
        context_len: 0,
        tokens: &prompt,
    }])?;
    eprintln!("consistency: prefill in two chunks");
    // Two chunks: 50 then 27 (a later turn on cached KV).
    model.forward_logits(&[SeqStep {
        block_table: &table_b,
        context_len: 0,
        tokens: &prompt[..50],
    }])?;
    let chunked = model.forward_logits(&[SeqStep {
        block_table: &table_b,
        context_len: 50,
        tokens: &prompt[50..],
    }])?;
    record(
        "prefill in two chunks == one prefill",
        &chunked,
        &one_shot,
        results,
    );
    eprintln!("consistency: prefix + decode steps");
    // Prefix 70, then 7 single-token decode steps.
    model.forward_logits(&[SeqStep {
        block_table: &table_c,
        context_len: 0,
        tokens: &prompt[..70],
    }])?;
    let mut last = None;
    for i in 70..n {
        last = Some(model.forward_logits(&[SeqStep {
            block_table: &table_c,
            context_len: i,
            tokens: &prompt[i..i + 1],
        }])?);
    }
    record(
        "prefix + token-by-token decode == one prefill",
        last.as_ref().unwrap(),
        &one_shot,
        results,
    );
    // Batched decode of the three sequences (all hold the same 77-token context now) with different
    // next tokens, against each alone.
    let tables = [&table_a, &table_b, &table_c];
    let batch: Vec<SeqStep<'_>> = (0..3)
        .map(|s| SeqStep {
            block_table: tables[s],
            context_len: n,
            tokens: &next[s],
        })
        .collect();
    eprintln!("consistency: batched decode");
    let batched = model.forward_logits(&batch)?;
    #[allow(clippy::needless_range_loop)]
    for s in 0..3 {
        let alone = model.forward_logits(&[batch[s]])?;
        let row = Logits {
            rows: 1,
            vocab,
            data: batched.row(s).to_vec(),
        };
        record(
            &format!("batched decode row {s} == decoded alone"),
            &row,
            &alone,
            results,
        );
    }
    eprintln!("consistency: eager vs graph");
    // Graph replay vs eager launches: same kernels, so bit-identical.
    let graphs = model.options.use_cuda_graphs;
    model.options.use_cuda_graphs = !graphs;
    let other = model.forward_logits(&batch)?;
    model.options.use_cuda_graphs = graphs;
    let d = diff_logits(0, &other, &batched, 0.0);
    results.push((
        "graph replay == eager launches (bit-exact)".to_string(),
        d.max_abs_diff,
        d.max_abs_diff == 0.0,
    ));
    Ok(())
}

fn pruned_last_layer_checks(
    model: &mut CudaModel,
    fx: &Fixture,
    results: &mut Results,
) -> Result<(), CudaError> {
    let Fixture {
        vocab,
        n,
        ref prompt,
        ref table_a,
        ref table_b,
        ref table_c,
        ref next,
        ..
    } = *fx;
    let record =
        |name: &str, a: &Logits, b: &Logits, results: &mut Results| fx.record(name, a, b, results);
    // (9) The pruned last layer of prefill steps (attention, o_proj and MLP on each sequence's
    // last row only, attention as a decode batch) against the whole last layer: one sequence
    // (the 77-token prompt: the one-row GEMV tail), then a batched prefill of three sequences
    // whose last rows are not the first rows (5 new tokens, 1 new token, the 77-token prompt
    // again), so the gather and the compact rows are exercised. Both arms write the same KV.
    let three = [
        SeqStep {
            block_table: &table_a,
            context_len: n,
            tokens: &prompt[..5],
        },
        SeqStep {
            block_table: &table_b,
            context_len: n,
            tokens: &next[1],
        },
        SeqStep {
            block_table: &table_c,
            context_len: 0,
            tokens: &prompt,
        },
    ];
    let one = [SeqStep {
        block_table: &table_c,
        context_len: 0,
        tokens: &prompt,
    }];
    for (what, step) in [
        (format!("prefill of {n} tokens"), &one[..]),
        (
            format!("batched prefill (5 on {n} cached, 1 on {n} cached, {n} fresh)"),
            &three[..],
        ),
    ] {
        eprintln!("consistency: pruned vs whole last layer, {what}");
        let was = model.set_prune_last_layer(true);
        let pruned = model.forward_logits(step);
        model.set_prune_last_layer(false);
        let whole = model.forward_logits(step);
        model.set_prune_last_layer(was);
        let (pruned, whole) = (pruned?, whole?);
        for s in 0..step.len() {
            let row = |l: &Logits| Logits {
                rows: 1,
                vocab,
                data: l.row(s).to_vec(),
            };
            record(
                &format!("{what} row {s}: last layer on the last rows only == whole last layer"),
                &row(&pruned),
                &row(&whole),
                results,
            );
        }
    }
    Ok(())
}

/// Decode attention with one thread block per KV head (all query heads of its group) against one
/// per query head, on a batch of three decodes and on one alone (more splits of its context):
/// grouped-query models only (for one query head per KV head the kernels do the same work).
fn decode_attention_checks(
    model: &mut CudaModel,
    fx: &Fixture,
    results: &mut Results,
) -> Result<(), CudaError> {
    let was = model.set_decode_attention_per_kv_head(true);
    if !model.decode_attention_per_kv_head()
        || model.config.num_attention_heads == model.config.num_key_value_heads
    {
        model.set_decode_attention_per_kv_head(was);
        return Ok(());
    }
    let tables = [&fx.table_a, &fx.table_b, &fx.table_c];
    // Every table holds the prompt's n tokens by now; each decode rewrites the KV of position n
    // with the same value, so the two arms see the same context.
    let batch: Vec<SeqStep<'_>> = (0..3)
        .map(|s| SeqStep {
            block_table: tables[s],
            context_len: fx.n,
            tokens: &fx.next[s],
        })
        .collect();
    for (what, step) in [("batch of 3", &batch[..]), ("one sequence", &batch[..1])] {
        eprintln!("consistency: decode attention per KV head vs per query head, {what}");
        model.set_decode_attention_per_kv_head(true);
        let per_kv = model.forward_logits(step);
        model.set_decode_attention_per_kv_head(false);
        let per_query = model.forward_logits(step);
        model.set_decode_attention_per_kv_head(was);
        fx.record(
            &format!("decode {what}: attention per KV head == per query head"),
            &per_kv?,
            &per_query?,
            results,
        );
    }
    Ok(())
}

fn long_prompt_checks(
    model: &mut CudaModel,
    fx: &Fixture,
    results: &mut Results,
) -> Result<(), CudaError> {
    let Fixture {
        vocab, bs, blocks, ..
    } = *fx;
    let record =
        |name: &str, a: &Logits, b: &Logits, results: &mut Results| fx.record(name, a, b, results);
    // (4) A long prefill with the timed cuBLASLt GEMM choice == the same with cublasGemmEx, where
    // the model is sized for one (the first call tunes, then runs the chosen algorithms).
    // 2048 tokens (the benchmark's prefill shape) where the model takes them.
    let long = 2048
        .min(model.options.max_tokens_per_step)
        .min(model.config.max_position_embeddings);
    let first_free = 3 * blocks;
    let long_blocks = long.div_ceil(bs);
    if model.has_gemm_tuning()
        && long >= model.gemm_tuning_min_rows()
        && model.options.max_blocks_per_seq >= long_blocks
        && first_free + long_blocks <= model.kv_pool().num_blocks()
    {
        eprintln!("consistency: tuned vs cublasGemmEx prefill GEMMs ({long} tokens)");
        let prompt_long: Vec<u32> = (0..long).map(|i| ((i * 7919 + 3) % vocab) as u32).collect();
        let table_d: Vec<u32> = (first_free as u32..(first_free + long_blocks) as u32).collect();
        // The later turn the wgmma and fused-GEMM checks compare: 613 tokens on 1000 cached, off
        // every tile, chunk and block boundary.
        let context = 1000.min(long / 2);
        let turn_len = 613.min(long - context);
        let later = [SeqStep {
            block_table: &table_d,
            context_len: context,
            tokens: &prompt_long[context..context + turn_len],
        }];
        let step = [SeqStep {
            block_table: &table_d,
            context_len: 0,
            tokens: &prompt_long,
        }];
        let tuned = model.forward_logits(&step)?;
        let was = model.set_gemm_tuning(false);
        let plain = model.forward_logits(&step);
        model.set_gemm_tuning(was);
        record(
            "prefill with tuned cuBLASLt GEMMs == with cublasGemmEx",
            &tuned,
            &plain?,
            results,
        );
        let long_prompt = LongPrompt {
            long,
            long_blocks,
            context,
            turn_len,
            prompt: &prompt_long,
            table: &table_d,
            step: &step,
            later: &later,
            tuned: &tuned,
        };
        wgmma_attention_checks(model, fx, &long_prompt, results)?;
        residual_and_own_gemm_checks(model, fx, &long_prompt, results)?;
    }
    Ok(())
}

/// The long prompt of the checks that compare paths at prefill sizes, and its later turn (613
/// tokens on 1000 cached, off every tile, chunk and block boundary).
struct LongPrompt<'a> {
    long: usize,
    long_blocks: usize,
    context: usize,
    turn_len: usize,
    prompt: &'a [u32],
    table: &'a [u32],
    step: &'a [SeqStep<'a>],
    later: &'a [SeqStep<'a>],
    /// Logits of `step` on the default path.
    tuned: &'a Logits,
}

fn wgmma_attention_checks(
    model: &mut CudaModel,
    fx: &Fixture,
    lp: &LongPrompt<'_>,
    results: &mut Results,
) -> Result<(), CudaError> {
    let Fixture {
        vocab,
        bs,
        n,
        blocks,
        ref table_a,
        ..
    } = *fx;
    let LongPrompt {
        long,
        long_blocks,
        context,
        turn_len,
        prompt: prompt_long,
        table: table_d,
        step,
        later,
        tuned,
    } = *lp;
    let record =
        |name: &str, a: &Logits, b: &Logits, results: &mut Results| fx.record(name, a, b, results);
    // (5) The wgmma prefill attention (the kernel chosen at start-up) against the mma.sync
    // kernel on the same long prompt: every causal tile shape of a 2048-token
    // prefill; then a later turn on that cached prompt that starts off every tile and chunk
    // boundary (context 1000: 1000 % 128 = 104, 1000 % 16 = 8) and ends in a partial tile
    // and a partial KV block (613 tokens).
    if model.uses_wgmma_prefill() {
        let name = model.prefill_attention_name();
        eprintln!("consistency: {name} vs mma.sync prefill attention ({long} tokens)");
        model.set_wgmma_prefill(false);
        let mma = model.forward_logits(&step);
        model.set_wgmma_prefill(true);
        record(
            &format!("prefill with {name} attention == with mma.sync attention"),
            &tuned,
            &mma?,
            results,
        );
        eprintln!(
            "consistency: {name} vs mma.sync on a later turn ({turn_len} tokens after {context})"
        );
        let wg = model.forward_logits(&later)?;
        model.set_wgmma_prefill(false);
        let mma = model.forward_logits(&later);
        model.set_wgmma_prefill(true);
        record(
            &format!(
                "later turn ({turn_len} tokens on {context} cached) with {name} attention == with mma.sync"
            ),
            &wg,
            &mma?,
            results,
        );
        // A batched prefill step of three sequences of different shapes: the later turn
        // again, a fresh 400-token prompt (on the blocks of the long table past the later
        // turn's end; its own KV is written before it is read) and 5 tokens on the cached
        // 77-token prompt of the first check. The persistent kernel takes the tiles of all
        // three longest first, interleaved.
        let turn_end_block = (context + turn_len).div_ceil(bs);
        let fresh = 400usize.min((long_blocks - turn_end_block) * bs);
        if fresh > 0 && n + 5 <= blocks * bs {
            let table_e = &table_d[turn_end_block..];
            let short_turn: Vec<u32> = (0..5).map(|i| ((i * 31 + 11) % vocab) as u32).collect();
            let batch = [
                later[0],
                SeqStep {
                    block_table: table_e,
                    context_len: 0,
                    tokens: &prompt_long[..fresh],
                },
                SeqStep {
                    block_table: &table_a,
                    context_len: n,
                    tokens: &short_turn,
                },
            ];
            eprintln!("consistency: {name} vs mma.sync on a batched prefill of three sequences");
            let wg = model.forward_logits(&batch)?;
            model.set_wgmma_prefill(false);
            let mma = model.forward_logits(&batch);
            model.set_wgmma_prefill(true);
            record(
                &format!(
                    "batched prefill ({turn_len} on {context} cached, {fresh} fresh, 5 on {n} cached) with {name} attention == with mma.sync"
                ),
                &wg,
                &mma?,
                results,
            );
        }
    }
    Ok(())
}

fn residual_and_own_gemm_checks(
    model: &mut CudaModel,
    fx: &Fixture,
    lp: &LongPrompt<'_>,
    results: &mut Results,
) -> Result<(), CudaError> {
    let tolerance_rel = fx.tolerance_rel;
    let LongPrompt {
        long,
        context,
        turn_len,
        step,
        later,
        tuned,
        ..
    } = *lp;
    let record =
        |name: &str, a: &Logits, b: &Logits, results: &mut Results| fx.record(name, a, b, results);
    // (6) The residual stream in the weights' type (the default for steps this long) against
    // the f32 stream on the same long prompt: one rounding per residual add, 2 x layers adds.
    let half_from = model.half_residual_min_tokens();
    if long >= half_from {
        eprintln!("consistency: fp16 vs f32 residual stream ({long} tokens)");
        model.set_half_residual_min_tokens(usize::MAX);
        let f32_stream = model.forward_logits(&step);
        model.set_half_residual_min_tokens(half_from);
        record(
            "prefill with the residual in the weights' type == with an f32 residual",
            &tuned,
            &f32_stream?,
            results,
        );
    }
    // (7) The own warp-specialised wgmma GEMM (sm_90a): alone on layer 0's gate_up weight at
    // the real shape (plain output against cuBLAS, and the fused SiLU-mul epilogue against
    // cuBLAS + silu_mul; catches layout bugs), then the whole prefill with gate_up + SiLU-mul
    // fused against cuBLAS + silu_mul on the long prompt and on the later turn.
    if model.has_own_gate_up() {
        eprintln!("consistency: own wgmma GEMM vs cuBLAS on layer 0's gate_up ({long} rows)");
        let (checks, _) = super::own_gemm::own_gemm_check(model, long, 0)?;
        for (name, max_diff, ref_max) in checks {
            let ok = max_diff <= tolerance_rel * ref_max.max(1.0);
            results.push((name, max_diff, ok));
        }
        eprintln!("consistency: fused gate_up GEMM vs cuBLAS + silu_mul ({long} tokens)");
        let was = model.set_own_gate_up_min_tokens(1);
        let own = model.forward_logits(&step);
        model.set_own_gate_up_min_tokens(usize::MAX);
        let cublas = model.forward_logits(&step);
        model.set_own_gate_up_min_tokens(was);
        record(
            "prefill with the fused gate_up GEMM == with cuBLAS + silu_mul",
            &own?,
            &cublas?,
            results,
        );
        eprintln!(
            "consistency: fused gate_up GEMM vs cuBLAS + silu_mul on a later turn ({turn_len} tokens after {context})"
        );
        model.set_own_gate_up_min_tokens(1);
        let own = model.forward_logits(&later);
        model.set_own_gate_up_min_tokens(usize::MAX);
        let cublas = model.forward_logits(&later);
        model.set_own_gate_up_min_tokens(was);
        record(
            &format!(
                "later turn ({turn_len} tokens on {context} cached) with the fused gate_up GEMM == with cuBLAS + silu_mul"
            ),
            &own?,
            &cublas?,
            results,
        );
    }
    Ok(())
}
