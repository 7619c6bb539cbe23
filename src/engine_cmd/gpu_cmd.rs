//! `djinn engine bench` and `djinn engine check ...`: the CUDA backend's benchmark and GPU checks.
//! Built without `--features cuda`, they exit with an error saying so.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::tuning_args::{DecodeGemmArg, TuningArgs};

#[derive(Args)]
pub struct BenchArgs {
    /// Model preset (weights are seeded random, generated on the GPU).
    #[arg(long, default_value = "llama2-7b")]
    pub model: String,
    /// f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// Prefill lengths to time (tokens, one sequence each).
    #[arg(long, value_delimiter = ',', default_value = "512,2048,4096")]
    pub prefill: Vec<usize>,
    /// Decode batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub batches: Vec<usize>,
    /// Decode contexts (tokens each sequence attends to, its new token included).
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    pub contexts: Vec<usize>,
    /// Prefill chunks on a cached context, CHUNK@CACHED (e.g. 2048@100000: 2048 new tokens on top
    /// of 100000 tokens already in the KV cache).
    #[arg(long, value_delimiter = ',', value_parser = parse_chunk)]
    pub chunks: Vec<(usize, usize)>,
    /// KV pool blocks (default: the memory left after weights and buffers; configurations that
    /// do not fit it are skipped and said so).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Launch every kernel each step instead of replaying captured CUDA graphs.
    #[arg(long)]
    pub no_graphs: bool,
    /// JSON written by engine/scripts/hf_bench.py, shown side by side (and merged into the output).
    #[arg(long)]
    pub hf_results: Option<PathBuf>,
    /// Directory for engine_bench.json and engine_bench.csv.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Also time each prefill's GPU span and host enqueue time, and profile one prefill right
    /// after the timed ones (the card still hot): where the wall-vs-GPU gap goes.
    #[arg(long)]
    pub prefill_gap: bool,
    /// Time every decode row under each of these settings of --decode-gemm in turn and print
    /// them side by side with their floor ratios (default: --decode-gemm's alone).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub decode_gemm_arms: Vec<DecodeGemmArg>,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

/// `CHUNK@CACHED` of `--chunks`.
fn parse_chunk(text: &str) -> Result<(usize, usize), String> {
    let (chunk, cached) = text
        .split_once('@')
        .ok_or_else(|| format!("`{text}`: expected CHUNK@CACHED, e.g. 2048@100000"))?;
    let number = |part: &str| {
        part.trim()
            .parse::<usize>()
            .map_err(|e| format!("`{text}`: `{part}` is not a token count ({e})"))
    };
    let (chunk, cached) = (number(chunk)?, number(cached)?);
    if chunk == 0 {
        return Err(format!("`{text}`: the chunk must have at least one token"));
    }
    Ok((chunk, cached))
}

#[derive(Args)]
pub struct GemmSearchArgs {
    /// Model preset (weights are seeded random, generated on the GPU).
    #[arg(long, default_value = "llama2-7b")]
    pub model: String,
    /// f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// Prompt lengths (GEMM rows) to search; each is a row bucket of the table (multiples of 512).
    #[arg(long, value_delimiter = ',', default_value = "512,2048,4096")]
    pub rows: Vec<usize>,
    /// Table to write (the shipped one is engine/data/gemm_configs.tsv); required unless
    /// --own-gemm.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Instead of searching: check the own wgmma GEMM (sm_90) against cuBLAS on layer 0's
    /// gate_up at each --rows (plain, and with the SiLU-mul epilogue against cuBLAS + silu_mul)
    /// and time both (any row counts).
    #[arg(long)]
    pub own_gemm: bool,
    /// Calls per timed arm of --own-gemm.
    #[arg(long, default_value_t = 20)]
    pub own_gemm_reps: usize,
    /// Most configurations screened (timed cool) per shape.
    #[arg(long, default_value_t = 400)]
    pub max_screened: usize,
    /// Configurations timed hot per shape (besides cublasGemmEx and the heuristic-timed choice).
    #[arg(long, default_value_t = 8)]
    pub hot_finalists: usize,
    /// Heat-soak before each shape's hot timing, ms.
    #[arg(long, default_value_t = 1500.0)]
    pub heat_ms: f64,
    /// Rounds of the hot timing.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// At these row counts, also time the fastest hot arms (and cublasGemmEx) inside real
    /// back-to-back prefills and keep the fastest there (the figure that matters).
    #[arg(long, value_delimiter = ',')]
    pub in_forward_rows: Vec<usize>,
    /// Hot arms per shape compared in the forward.
    #[arg(long, default_value_t = 4)]
    pub in_forward_arms: usize,
    /// Rounds of the in-forward comparison (arms interleaved).
    #[arg(long, default_value_t = 3)]
    pub in_forward_rounds: usize,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

#[derive(Args)]
pub struct CheckArgs {
    #[command(subcommand)]
    pub command: CheckCommand,
}

#[derive(Subcommand)]
pub enum CheckCommand {
    /// Self-consistency of the CUDA forward on one model: chunked prefill, prefill + decode, batched
    /// vs single decode, graph replay vs eager.
    Consistency {
        /// A preset (seeded random weights on the GPU) or a weights path (GGUF file / HF directory).
        #[arg(long, default_value = "llama2-7b")]
        model: String,
        #[arg(long, default_value = "f16")]
        dtype: String,
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        #[command(flatten)]
        tuning: TuningArgs,
    },
    /// CUDA against the CPU reference forward (f32) on the same weights: a scripted multi-sequence
    /// session (batched prefill, mixed decode + later turn, batched greedy decode), logits compared
    /// at every step.
    CudaVsCpu {
        /// HF directory (config.json + model.safetensors) or GGUF file.
        #[arg(long)]
        weights: PathBuf,
        #[arg(long, default_value = "f16")]
        dtype: String,
        /// Batched greedy decode steps after the prefills.
        #[arg(long, default_value_t = 40)]
        steps: usize,
        /// Tolerance on max |logit difference|, relative to max(1, max |reference logit|).
        #[arg(long)]
        tolerance: Option<f32>,
        #[command(flatten)]
        tuning: TuningArgs,
    },
    /// Writes the CUDA model's weights as an HF checkpoint plus the engine's logits for a fixed
    /// prompt; engine/scripts/hf_compare_7b.py (llama2-7b) or hf_compare_long.py (any preset, long
    /// prompts with decode steps) then compares them with HF transformers.
    HfDump {
        #[arg(long, default_value = "llama2-7b")]
        model: String,
        #[arg(long, default_value = "f16")]
        dtype: String,
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        /// Output directory (config.json, model.safetensors, engine_logits.json).
        #[arg(long)]
        out: PathBuf,
        /// Tokens of a second, long prompt run as one prefill (the benchmark's prefill path:
        /// large-step GEMMs, wgmma attention, residual in the weights' type, pruned last layer);
        /// its last token's logits go into the dump too. 0 skips it.
        #[arg(long, default_value_t = 2048)]
        long: usize,
        /// Decode steps after the long prefill (teacher-forced: the long prompt continues), each
        /// step's logits in the dump: decode attention over a context of `--long` tokens and more.
        #[arg(long, default_value_t = 0)]
        long_decode: usize,
        /// Most tokens in one step: a longer `--long` prompt is prefilled in chunks of this size
        /// (chunked prefill on a growing cached context).
        #[arg(long, default_value_t = 32768)]
        max_step_tokens: usize,
        #[command(flatten)]
        tuning: TuningArgs,
    },
}

#[cfg(not(feature = "cuda"))]
pub fn bench(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("this djinn was built without the CUDA backend; rebuild with `cargo build --release --features cuda`")
}

#[cfg(not(feature = "cuda"))]
pub fn gemm_search(_args: GemmSearchArgs) -> anyhow::Result<()> {
    anyhow::bail!("this djinn was built without the CUDA backend; rebuild with `cargo build --release --features cuda`")
}

#[cfg(not(feature = "cuda"))]
pub fn check(_args: CheckArgs) -> anyhow::Result<()> {
    anyhow::bail!("this djinn was built without the CUDA backend; rebuild with `cargo build --release --features cuda`")
}

#[cfg(not(feature = "cuda"))]
pub fn generate_greedy_cuda(
    _weights: &engine::weights::WeightSet,
    _prompt: &[u32],
    _steps: usize,
    _stop_tokens: &[u32],
    _block_size: usize,
) -> anyhow::Result<Vec<u32>> {
    anyhow::bail!("this djinn was built without the CUDA backend; rebuild with `cargo build --release --features cuda`")
}

#[cfg(feature = "cuda")]
pub use with_cuda::{bench, check, gemm_search, generate_greedy_cuda};

#[cfg(feature = "cuda")]
mod with_cuda {
    use super::*;
    use anyhow::Context;
    use engine::config::{DType, ModelConfig};
    use engine::cuda::{CudaModel, CudaModelOptions, EngineTuning, GpuDevice, WeightSource};
    use engine::probe::forward::{bench as cb, check as cc, gemm_search as gs, own_gemm};
    use engine::probe::provenance::Provenance;
    use engine::weights::WeightSet;
    use std::path::Path;

    pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
        match s {
            "f16" | "fp16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            other => anyhow::bail!("--dtype {other}: expected f16 or bf16"),
        }
    }

    fn print_device(device: &GpuDevice) {
        println!(
            "device: {} (sm_{}{}, {} SMs, {:.1} GiB)",
            device.name,
            device.compute_capability.0,
            device.compute_capability.1,
            device.num_sms,
            device.total_memory_bytes as f64 / (1u64 << 30) as f64
        );
    }

    /// Opens a CUDA model from a preset name (random weights generated on the GPU) or a weights path.
    pub fn open_cuda_model(
        model: &str,
        dtype: DType,
        seed: u64,
        options: Option<CudaModelOptions>,
        tuning: EngineTuning,
    ) -> anyhow::Result<CudaModel> {
        let device = GpuDevice::open(0)?;
        print_device(&device);
        if let Some(config) = ModelConfig::preset(model) {
            let mut opts = options.unwrap_or_else(|| CudaModelOptions::for_config(&config));
            opts.dtype = dtype;
            opts.tuning = tuning;
            let started = std::time::Instant::now();
            let m = CudaModel::new(device, WeightSource::DeviceRandom { config, seed }, opts)?;
            println!("model {model}: random weights (seed {seed}) generated on the GPU; start-up {:.2} s", started.elapsed().as_secs_f64());
            Ok(m)
        } else {
            let path = PathBuf::from(model);
            let ws = WeightSet::load(&path)
                .with_context(|| format!("loading weights from {}", path.display()))?;
            let mut opts = options.unwrap_or_else(|| CudaModelOptions::for_config(&ws.config));
            opts.dtype = dtype;
            opts.tuning = tuning;
            Ok(CudaModel::new(device, WeightSource::Host(&ws), opts)?)
        }
    }

    /// The `--model` preset of the bench commands, or an error listing the presets.
    fn preset_named(model: &str) -> anyhow::Result<ModelConfig> {
        ModelConfig::preset(model).with_context(|| {
            format!(
                "--model {model}: not a preset ({:?})",
                ModelConfig::PRESET_NAMES
            )
        })
    }

    /// The model sized for one sequence of the largest of `--rows` (the GEMM search and the own-GEMM
    /// check run single-sequence steps of those row counts; `--rows` is checked non-empty first).
    fn open_for_row_counts(
        args: &GemmSearchArgs,
        dtype: DType,
        config: &ModelConfig,
    ) -> anyhow::Result<CudaModel> {
        let max_rows = *args.rows.iter().max().expect("checked non-empty");
        let mut options = CudaModelOptions::for_config(config);
        options.dtype = dtype;
        options.max_tokens_per_step = max_rows;
        options.max_seqs_per_step = 1;
        options.num_kv_blocks = Some(max_rows.div_ceil(options.block_size_tokens));
        open_cuda_model(
            &args.model,
            dtype,
            args.seed,
            Some(options),
            args.tuning.to_tuning()?,
        )
    }

    pub fn gemm_search(args: GemmSearchArgs) -> anyhow::Result<()> {
        let dtype = parse_dtype(&args.dtype)?;
        let config = preset_named(&args.model)?;
        if args.own_gemm {
            return own_gemm(args, dtype, config);
        }
        let Some(out) = args.out.clone() else {
            anyhow::bail!("--out FILE is required (the table to write) unless --own-gemm");
        };
        if args.rows.is_empty() || args.rows.iter().any(|&r| r < 512 || r % 512 != 0) {
            anyhow::bail!(
                "--rows {:?}: expected multiples of 512 (the table's row buckets)",
                args.rows
            );
        }
        if args.rounds == 0
            || args.hot_finalists == 0
            || args.heat_ms.is_nan()
            || args.heat_ms < 0.0
        {
            anyhow::bail!("--rounds and --hot-finalists must be >= 1 and --heat-ms >= 0");
        }
        let mut model = open_for_row_counts(&args, dtype, &config)?;
        let version = model
            .cublaslt_version()
            .context("the GEMM search needs libcublasLt and the tuned GEMM path")?;
        let search = gs::GemmSearchOptions {
            max_screened: args.max_screened,
            hot_finalists: args.hot_finalists,
            heat_ms: args.heat_ms,
            rounds: args.rounds,
            ..Default::default()
        };
        let mut table = vec![
            format!(
                "# Searched cuBLASLt configurations for the prefill GEMMs: `djinn engine gemm-search --model {} --dtype {} --rows {}`",
                args.model,
                args.dtype,
                args.rows.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")
            ),
            format!("# device {}, cuBLASLt {version}; a row means: GEMMs of this (n, k, output) whose row count rounds up to m_bucket use this configuration", model.device.name),
            "# (choice gemm_ex = cublasGemmEx won; hot_ms = the winner's median ms per call at the power cap).".to_string(),
            engine::cuda::GEMM_TABLE_HEADER.to_string(),
        ];
        for &rows in &args.rows {
            let started = std::time::Instant::now();
            let mut search = search;
            if args.in_forward_rows.contains(&rows) {
                search.in_forward_arms = args.in_forward_arms.max(1);
                search.in_forward_rounds = args.in_forward_rounds.max(1);
            }
            let (report, lines) = gs::gemm_search(&mut model, rows, &search)?;
            for l in report {
                println!("search {rows}: {l}");
            }
            println!("search {rows}: {:.1} s", started.elapsed().as_secs_f64());
            table.extend(lines);
        }
        std::fs::write(&out, table.join("\n") + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
        Ok(())
    }

    /// `gemm-search --own-gemm`: the own wgmma GEMM against cuBLAS at each row count.
    fn own_gemm(args: GemmSearchArgs, dtype: DType, config: ModelConfig) -> anyhow::Result<()> {
        if args.rows.is_empty() || args.rows.contains(&0) || args.own_gemm_reps == 0 {
            anyhow::bail!("--rows must be non-empty row counts >= 1 and --own-gemm-reps >= 1");
        }
        let mut model = open_for_row_counts(&args, dtype, &config)?;
        let mut failed = 0;
        for &rows in &args.rows {
            let (checks, lines) = own_gemm::own_gemm_check(&mut model, rows, args.own_gemm_reps)?;
            for (name, max_diff, ref_max) in checks {
                let ok = max_diff <= 0.02 * ref_max.max(1.0);
                failed += usize::from(!ok);
                println!(
                    "{} {name}: max|diff| {max_diff:.3e} (max|ref| {ref_max:.3}, tolerance 0.02 x max(1, max|ref|))",
                    if ok { "PASS" } else { "FAIL" }
                );
            }
            for l in lines {
                println!("{l}");
            }
        }
        if failed > 0 {
            anyhow::bail!("{failed} own GEMM comparison(s) failed");
        }
        Ok(())
    }

    pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
        let dtype = parse_dtype(&args.dtype)?;
        let config = preset_named(&args.model)?;
        let options = bench_options(&args, dtype, &config);
        let max_batch = args.batches.iter().copied().max().unwrap_or(1);
        let tuning = args.tuning.to_tuning()?;
        let mut model = open_cuda_model(&args.model, dtype, args.seed, Some(options), tuning)?;
        print_memory_plan(&model);
        let started = std::time::Instant::now();
        model.capture_decode_graphs(max_batch)?;
        println!(
            "decode graphs captured up to batch {max_batch} in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let grid = cb::BenchGrid {
            prefill_lengths: args.prefill.clone(),
            chunks: args.chunks.clone(),
            decode_batches: args.batches.clone(),
            decode_contexts: args.contexts.clone(),
            prefill_gap: args.prefill_gap,
            decode_gemm_arms: args
                .decode_gemm_arms
                .iter()
                .map(|arm| arm.to_engine())
                .collect(),
        };
        let mut rows = cb::run_grid(&mut model, &grid, |row| {
            println!("{}", cb::format_row(row));
        })?;
        for line in cb::format_decode_gemm_pairs(&rows) {
            println!("{line}");
        }
        for p in &bench_profiles(&mut model, &args, max_batch)? {
            println!("{p}");
        }
        for line in model.gemm_tuning_report() {
            println!("tuning: {line}");
        }
        if let Some(path) = &args.hf_results {
            rows.extend(hf_side_by_side(path, &rows)?);
        }
        let report = cb::BenchReport {
            provenance: Provenance::collect(&model.device, &crate::runio::code_version()),
            prefill_attention: model.prefill_attention_name().to_string(),
            device: model.device.name.clone(),
            model: args.model.clone(),
            dtype: args.dtype.clone(),
            kv_blocks: model.kv_pool().num_blocks(),
            kv_block_bytes: model.kv_pool().block_bytes(),
            cuda_graphs: model.options.use_cuda_graphs,
            rows,
        };
        write_bench_report(&report, &args.out)
    }

    /// The model options of `djinn engine bench`: steps for the largest prefill, chunk and decode
    /// batch of the grid; the KV pool takes the memory left (or `--kv-blocks`).
    fn bench_options(args: &BenchArgs, dtype: DType, config: &ModelConfig) -> CudaModelOptions {
        let mut options = CudaModelOptions::for_config(config);
        options.dtype = dtype;
        options.use_cuda_graphs = !args.no_graphs;
        let max_batch = args.batches.iter().copied().max().unwrap_or(1);
        options.num_kv_blocks = args.kv_blocks;
        options.max_tokens_per_step = args
            .prefill
            .iter()
            .chain(args.chunks.iter().map(|(chunk, _)| chunk))
            .copied()
            .max()
            .unwrap_or(512)
            .max(max_batch);
        options.max_seqs_per_step = max_batch.max(1);
        options
    }

    /// The start-up memory plan and the KV pool.
    fn print_memory_plan(model: &CudaModel) {
        for (what, bytes) in &model.memory_breakdown {
            println!(
                "  memory: {what}: {:.1} MiB",
                *bytes as f64 / (1 << 20) as f64
            );
        }
        println!(
            "KV pool: {} blocks x {} bytes at device address {:#x}; CUDA graphs {}",
            model.kv_pool().num_blocks(),
            model.kv_pool().block_bytes(),
            model.kv_pool().base_device_ptr(),
            if model.options.use_cuda_graphs {
                "on"
            } else {
                "off"
            }
        );
    }

    /// Where the time goes (eager launches, an event after every kernel and GEMM): one prefill
    /// (2048 tokens if timed, else the first length) and decode at the largest context, batch 1
    /// and the largest batch (where the pool holds them).
    fn bench_profiles(
        model: &mut CudaModel,
        args: &BenchArgs,
        max_batch: usize,
    ) -> anyhow::Result<Vec<String>> {
        let bs = model.options.block_size_tokens;
        let mut profiles = Vec::new();
        if let Some(&n) = args
            .prefill
            .iter()
            .find(|&&n| n == 2048)
            .or(args.prefill.first())
        {
            profiles.push(cb::format_profile(
                &format!("prefill {n}"),
                &cb::profile_prefill(model, n)?,
            ));
        }
        let big_ctx = args.contexts.iter().copied().max().unwrap_or(512);
        for &b in [1usize, max_batch].iter() {
            if b * big_ctx.div_ceil(bs) <= model.kv_pool().num_blocks() {
                profiles.push(cb::format_profile(
                    &format!("decode batch {b} context {big_ctx}"),
                    &cb::profile_decode(model, b, big_ctx)?,
                ));
            }
        }
        Ok(profiles)
    }

    /// HF transformers' rows (engine/scripts/hf_bench.py's JSON) printed beside ours with the
    /// speed-up on the same (or the nearest) configuration; returns them for the report.
    fn hf_side_by_side(path: &Path, rows: &[cb::BenchRow]) -> anyhow::Result<Vec<cb::BenchRow>> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let hf: Vec<cb::BenchRow> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        println!(
            "-- HF transformers on the same card (from {}):",
            path.display()
        );
        for row in &hf {
            println!("{}", cb::format_row(row));
            if let Some(ours) = rows
                .iter()
                .find(|r| r.kind == row.kind && r.batch == row.batch && r.tokens == row.tokens)
            {
                println!(
                    "   djinn-cuda is x{:.2} faster than {} here",
                    row.ms_p50 / ours.ms_p50,
                    row.system
                );
            } else if let Some(ours) = rows
                .iter()
                .filter(|r| r.kind == row.kind && r.batch == row.batch)
                .min_by_key(|r| r.tokens.abs_diff(row.tokens))
            {
                println!(
                    "   djinn-cuda ({} tokens) is x{:.2} faster than {} ({} tokens)",
                    ours.tokens,
                    row.ms_p50 / ours.ms_p50,
                    row.system,
                    row.tokens
                );
            }
        }
        Ok(hf)
    }

    /// Writes engine_bench.json and engine_bench.csv into `out`.
    fn write_bench_report(report: &cb::BenchReport, out: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(out)?;
        let json_path = out.join("engine_bench.json");
        std::fs::write(&json_path, serde_json::to_string_pretty(report)?)?;
        let mut csv = String::from("device,system,kind,batch,tokens,cached_tokens,ms_p50,ms_mean,ms_min,reps,tokens_per_s,floor_ms_datasheet,ratio_to_datasheet_floor,floor_ms_measured_rates,ratio_to_measured_floor,decode_gemm\n");
        for r in &report.rows {
            csv += &format!(
                "{},{},{},{},{},{},{:.4},{:.4},{:.4},{},{:.1},{:.4},{:.3},{:.4},{:.3},{}\n",
                report.device,
                r.system,
                r.kind,
                r.batch,
                r.tokens,
                r.cached_tokens,
                r.ms_p50,
                r.ms_mean,
                r.ms_min,
                r.reps,
                r.tokens_per_s,
                r.floor_ms_datasheet,
                r.ratio_to_datasheet_floor,
                r.floor_ms_measured_rates,
                r.ratio_to_measured_floor,
                r.decode_gemm
            );
        }
        std::fs::write(out.join("engine_bench.csv"), csv)?;
        println!("wrote {} and engine_bench.csv", json_path.display());
        Ok(())
    }

    /// Greedy generation on the CUDA backend (for `djinn engine generate --backend cuda`).
    pub fn generate_greedy_cuda(
        weights: &WeightSet,
        prompt: &[u32],
        steps: usize,
        stop_tokens: &[u32],
        block_size: usize,
    ) -> anyhow::Result<Vec<u32>> {
        let device = GpuDevice::open(0)?;
        print_device(&device);
        let mut options = CudaModelOptions::for_config(&weights.config);
        options.block_size_tokens = block_size;
        options.max_blocks_per_seq = weights.config.max_position_embeddings.div_ceil(block_size);
        options.num_kv_blocks = Some((prompt.len() + steps).div_ceil(block_size).max(1));
        options.max_tokens_per_step = prompt.len().max(1);
        options.max_seqs_per_step = 1;
        let mut model = CudaModel::new(device, WeightSource::Host(weights), options)?;
        Ok(engine::batch::generate_greedy(
            &mut model,
            prompt,
            steps,
            stop_tokens,
        )?)
    }

    pub fn check(args: CheckArgs) -> anyhow::Result<()> {
        match args.command {
            CheckCommand::CudaVsCpu {
                weights,
                dtype,
                steps,
                tolerance,
                tuning,
            } => check_cuda_vs_cpu(&weights, &dtype, steps, tolerance, &tuning),
            CheckCommand::Consistency {
                model,
                dtype,
                seed,
                tuning,
            } => check_consistency(&model, &dtype, seed, &tuning),
            CheckCommand::HfDump {
                model,
                dtype,
                seed,
                out,
                long,
                long_decode,
                max_step_tokens,
                tuning,
            } => hf_dump(
                &model,
                &dtype,
                seed,
                &out,
                LongPrompt {
                    tokens: long,
                    decode_steps: long_decode,
                    max_step_tokens,
                },
                &tuning,
            ),
        }
    }

    /// `check cuda-vs-cpu`: the CUDA forward against the CPU reference on the same weights.
    fn check_cuda_vs_cpu(
        weights: &Path,
        dtype: &str,
        steps: usize,
        tolerance: Option<f32>,
        tuning: &TuningArgs,
    ) -> anyhow::Result<()> {
        let dtype = parse_dtype(dtype)?;
        let tol = tolerance.unwrap_or(if dtype == DType::Bf16 { 0.08 } else { 0.02 });
        let ws =
            WeightSet::load(weights).with_context(|| format!("loading {}", weights.display()))?;
        let blocks = 64;
        let mut cpu = engine::cpu::CpuModel::new(&ws, blocks, 16)?;
        let device = GpuDevice::open(0)?;
        print_device(&device);
        let mut options = CudaModelOptions::for_config(&ws.config);
        options.dtype = dtype;
        options.num_kv_blocks = Some(blocks);
        options.max_tokens_per_step = 256;
        options.max_seqs_per_step = 8;
        options.tuning = tuning.to_tuning()?;
        let mut gpu = CudaModel::new(device, WeightSource::Host(&ws), options)?;
        let report = cc::compare_backends(&mut gpu, &mut cpu, ws.config.vocab_size, steps, tol)
            .map_err(|e| anyhow::anyhow!(e))?;
        for d in &report.steps {
            println!(
                "step {:>2}: max |diff| {:.3e} (max |ref| {:.2}), rel L2 {:.2e}, argmax mismatches {} (near ties {})",
                d.step, d.max_abs_diff, d.ref_max_abs, d.rel_l2, d.argmax_mismatches, d.argmax_near_ties
            );
        }
        println!(
            "{} {}: CUDA {dtype:?} vs CPU f32 over {} steps: worst max |diff| {:.3e}, worst rel L2 {:.2e}, tolerance {tol} x max(1, max|ref|); greedy tokens identical for {} of {steps} decode steps",
            if report.passed { "PASS" } else { "FAIL" },
            weights.display(),
            report.steps.len(),
            report.worst_max_abs_diff,
            report.worst_rel_l2,
            report.greedy_steps_identical
        );
        anyhow::ensure!(
            report.passed,
            "CUDA and CPU logits disagree beyond the tolerance"
        );
        Ok(())
    }

    /// `check consistency`: the CUDA forward's paths against each other on one model.
    fn check_consistency(
        model: &str,
        dtype: &str,
        seed: u64,
        tuning: &TuningArgs,
    ) -> anyhow::Result<()> {
        let dtype = parse_dtype(dtype)?;
        let tuning = tuning.to_tuning()?;
        // Room for the 2048-token tuned-GEMM / prefill-attention checks next to the short
        // ones (where the model's positions allow), for presets and weight paths alike.
        let sized = |config: &ModelConfig| {
            let mut o = CudaModelOptions::for_config(config);
            o.num_kv_blocks = Some(160);
            o.max_tokens_per_step = 2048;
            o.max_seqs_per_step = 8;
            o
        };
        let mut m = if let Some(config) = ModelConfig::preset(model) {
            open_cuda_model(model, dtype, seed, Some(sized(&config)), tuning)?
        } else {
            let path = PathBuf::from(model);
            let ws = WeightSet::load(&path)
                .with_context(|| format!("loading weights from {}", path.display()))?;
            let mut opts = sized(&ws.config);
            opts.dtype = dtype;
            opts.tuning = tuning;
            let device = GpuDevice::open(0)?;
            print_device(&device);
            CudaModel::new(device, WeightSource::Host(&ws), opts)?
        };
        let tol = if dtype == DType::Bf16 { 0.08 } else { 0.02 };
        let results = cc::self_consistency(&mut m, tol)?;
        let mut failed = 0;
        for (name, diff, ok) in &results {
            println!(
                "{} {name}: max |diff| {diff:.3e} (tolerance {tol} x max(1, max|logit|))",
                if *ok { "PASS" } else { "FAIL" }
            );
            failed += usize::from(!ok);
        }
        anyhow::ensure!(failed == 0, "{failed} consistency checks failed");
        Ok(())
    }

    /// The long prompt of `check hf-dump`.
    struct LongPrompt {
        tokens: usize,
        decode_steps: usize,
        max_step_tokens: usize,
    }

    /// `check hf-dump`: the model as an HF checkpoint plus the engine's logits for fixed prompts
    /// (HF transformers then runs the same prompts on the same weights).
    fn hf_dump(
        model: &str,
        dtype: &str,
        seed: u64,
        out: &Path,
        long: LongPrompt,
        tuning: &TuningArgs,
    ) -> anyhow::Result<()> {
        let dtype = parse_dtype(dtype)?;
        anyhow::ensure!(
            long.max_step_tokens >= 64,
            "--max-step-tokens {}: at least 64",
            long.max_step_tokens
        );
        let long_total = long.tokens.saturating_add(long.decode_steps);
        anyhow::ensure!(
            long.decode_steps == 0 || long.tokens > 0,
            "--long-decode {} needs a --long prompt to decode after",
            long.decode_steps
        );
        let mut options = None;
        if let Some(config) = ModelConfig::preset(model) {
            anyhow::ensure!(
                long_total <= config.max_position_embeddings,
                "--long {} + --long-decode {}: the {model} preset has {} positions",
                long.tokens,
                long.decode_steps,
                config.max_position_embeddings
            );
            let mut o = CudaModelOptions::for_config(&config);
            o.num_kv_blocks = Some(8 + long_total.div_ceil(o.block_size_tokens));
            o.max_tokens_per_step = long.tokens.min(long.max_step_tokens).max(64);
            o.max_seqs_per_step = 2;
            options = Some(o);
        }
        let mut m = open_cuda_model(model, dtype, seed, options, tuning.to_tuning()?)?;
        let vocab = m.config.vocab_size;
        let prompt: Vec<u32> = (0..32).map(|i| ((i * 7919 + 17) % vocab) as u32).collect();
        let table: Vec<u32> = (0..4).collect();
        let prefix = 24usize;
        let mut decode_logits = Vec::new();
        m.forward_logits(&[engine::batch::SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: &prompt[..prefix],
        }])?;
        for i in prefix..prompt.len() {
            let l = m.forward_logits(&[engine::batch::SeqStep {
                block_table: &table,
                context_len: i,
                tokens: &prompt[i..i + 1],
            }])?;
            decode_logits.push(l.data);
        }
        let table2: Vec<u32> = (4..8).collect();
        let prefill = m.forward_logits(&[engine::batch::SeqStep {
            block_table: &table2,
            context_len: 0,
            tokens: &prompt,
        }])?;
        // The long prompt (and its decode continuation) on the blocks after the two short tables:
        // prefilled in chunks of at most max_tokens_per_step, then one token per step.
        let long_prompt: Vec<u32> = (0..long_total)
            .map(|i| ((i * 7919 + 3) % vocab) as u32)
            .collect();
        let mut long_logits = None;
        let mut long_decode_logits = Vec::new();
        if long.tokens > 0 {
            let bs = m.options.block_size_tokens;
            let table3: Vec<u32> = (8..(8 + long_total.div_ceil(bs)) as u32).collect();
            let chunk = m.options.max_tokens_per_step;
            let mut at = 0;
            while at < long_total {
                let n = if at < long.tokens {
                    chunk.min(long.tokens - at)
                } else {
                    1
                };
                let logits = m
                    .forward_logits(&[engine::batch::SeqStep {
                        block_table: &table3,
                        context_len: at,
                        tokens: &long_prompt[at..at + n],
                    }])?
                    .data;
                at += n;
                if at == long.tokens {
                    long_logits = Some(logits);
                } else if at > long.tokens {
                    long_decode_logits.push(logits);
                }
            }
        }
        let started = std::time::Instant::now();
        m.save_hf_checkpoint(out)?;
        println!(
            "wrote the HF checkpoint to {} in {:.1} s",
            out.display(),
            started.elapsed().as_secs_f64()
        );
        let json = serde_json::json!({
            "prompt": prompt,
            "decode_positions": (prefix..prompt.len()).collect::<Vec<_>>(),
            "decode_logits": decode_logits,
            "prefill_last_logits": prefill.data,
            "long_prompt": &long_prompt[..long.tokens],
            "long_prefill_last_logits": long_logits,
            "long_prefill_chunk_tokens": m.options.max_tokens_per_step,
            "long_decode_tokens": &long_prompt[long.tokens..],
            "long_decode_logits": long_decode_logits,
            "dtype": format!("{dtype:?}"),
            "device": m.device.name,
            "prefill_attention": m.prefill_attention_name(),
            "provenance": Provenance::collect(&m.device, &crate::runio::code_version()),
        });
        std::fs::write(out.join("engine_logits.json"), serde_json::to_vec(&json)?)?;
        println!("wrote {}", out.join("engine_logits.json").display());
        Ok(())
    }
}
