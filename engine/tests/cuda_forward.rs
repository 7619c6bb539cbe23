//! The CUDA forward against the CPU reference on the tiny models in tests/data, and its
//! self-consistency: run for real where a GPU exists, skipped with the reason printed where none
//! does (CI). `djinn engine check cuda-vs-cpu` / `check consistency` run the same checks.
//! Shared prefix blocks (the `shared_prefix` scenario) run here on the CUDA forward and the GPU
//! swap engine.

#[cfg(feature = "cuda")]
mod shared_prefix;

#[cfg(feature = "cuda")]
mod gpu {
    use engine::batch::PagedModel;
    use engine::cpu::CpuModel;
    use engine::cuda::{CudaModel, CudaModelOptions, GpuDevice, WeightSource};
    use engine::probe::forward::check;
    use engine::weights::WeightSet;
    use std::path::Path;

    fn open() -> Option<GpuDevice> {
        match GpuDevice::open(0) {
            Ok(device) => Some(device),
            Err(why) => {
                println!("skipping the CUDA forward checks: {why}");
                None
            }
        }
    }

    fn options(ws: &WeightSet) -> CudaModelOptions {
        let mut o = CudaModelOptions::for_config(&ws.config);
        o.num_kv_blocks = Some(64);
        o.max_tokens_per_step = 256;
        o.max_seqs_per_step = 8;
        o
    }

    #[test]
    fn cuda_matches_cpu_on_tiny_models() {
        for name in ["tiny", "tiny-gqa", "tiny-gqa-llama3", "tiny-gqa-bias"] {
            let Some(device) = open() else { return };
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data")
                .join(name);
            let ws = WeightSet::from_hf_dir(&dir).expect("tiny weights load");
            let mut cpu = CpuModel::new(&ws, 64, 16).expect("cpu model");
            let mut gpu =
                CudaModel::new(device, WeightSource::Host(&ws), options(&ws)).expect("cuda model");
            let report =
                check::compare_backends(&mut gpu, &mut cpu, ws.config.vocab_size, 40, 0.02)
                    .expect("ran");
            println!(
                "{name}: worst max |diff| {:.3e}, greedy identical for {} steps",
                report.worst_max_abs_diff, report.greedy_steps_identical
            );
            assert!(
                report.passed,
                "{name}: CUDA vs CPU beyond fp16 tolerance: {report:?}"
            );
            assert!(
                report.greedy_steps_identical >= 32,
                "{name}: greedy streams diverged early"
            );
        }
    }

    #[test]
    fn decode_attention_per_kv_head_matches_cpu_for_llama3_and_qwen_groups() {
        // Random tiny models with llama3.1-8b's group (4 query heads per KV head, head_dim 128)
        // and qwen2.5-7b's (7, head_dim 32): decode attention runs one thread block per KV head
        // (the default for grouped-query models) and must match the CPU reference.
        for (heads, kv_heads, head_dim) in [(8usize, 2usize, 128usize), (14, 2, 32)] {
            let Some(device) = open() else { return };
            let mut config = engine::config::ModelConfig::tiny_gqa();
            config.name = format!("tiny-{heads}q-{kv_heads}kv");
            config.num_attention_heads = heads;
            config.num_key_value_heads = kv_heads;
            config.hidden_size = heads * head_dim;
            let ws = WeightSet::random(&config, 11);
            let mut cpu = CpuModel::new(&ws, 64, 16).expect("cpu model");
            let mut gpu =
                CudaModel::new(device, WeightSource::Host(&ws), options(&ws)).expect("cuda model");
            assert!(gpu.decode_attention_per_kv_head(), "{}", config.name);
            let report =
                check::compare_backends(&mut gpu, &mut cpu, ws.config.vocab_size, 40, 0.02)
                    .expect("ran");
            println!(
                "{}: worst max |diff| {:.3e}, greedy identical for {} steps",
                config.name, report.worst_max_abs_diff, report.greedy_steps_identical
            );
            assert!(report.passed, "{}: {report:?}", config.name);
            for (check, diff, ok) in check::self_consistency(&mut gpu, 0.02).expect("ran") {
                assert!(ok, "{} {check}: max |diff| {diff}", config.name);
            }
        }
    }

    #[test]
    fn cuda_paged_forward_is_self_consistent() {
        // tiny-gqa-bias: the fused batch-1 bias add (gemv_rope) against rope_kv_write's.
        for name in ["tiny-gqa", "tiny-gqa-bias"] {
            let Some(device) = open() else { return };
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data")
                .join(name);
            let ws = WeightSet::from_hf_dir(&dir).expect("tiny weights load");
            let mut gpu =
                CudaModel::new(device, WeightSource::Host(&ws), options(&ws)).expect("cuda model");
            for (check, diff, ok) in check::self_consistency(&mut gpu, 0.02).expect("ran") {
                println!("{name} {check}: {diff:.3e}");
                assert!(ok, "{name} {check}: max |diff| {diff}");
            }
        }
    }

    #[test]
    fn long_chunked_context_matches_cpu() {
        // 480 tokens over 120 scattered 4-token blocks, far past the 64-token original context of
        // the Llama-3 scaling: a 300-token chunk, a 150-token chunk on top, then 30 decode steps
        // (split-KV decode attention over the paged context), each step's logits against the CPU.
        let Some(device) = open() else { return };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-gqa-llama3");
        let ws = WeightSet::from_hf_dir(&dir).expect("tiny weights load");
        let (block, context, pool) = (4usize, 480usize, 123usize);
        let table: Vec<u32> = (0..context / block)
            .map(|i| ((i * 37 + 5) % pool) as u32)
            .collect();
        let tokens: Vec<u32> = (0..context as u32).map(|i| (i * 7919 + 11) % 256).collect();
        let mut cpu = CpuModel::new(&ws, pool, block).expect("cpu model");
        let mut o = options(&ws);
        o.block_size_tokens = block;
        o.num_kv_blocks = Some(pool);
        o.max_tokens_per_step = 300;
        o.max_blocks_per_seq = ws.config.max_position_embeddings.div_ceil(block);
        let mut gpu = CudaModel::new(device, WeightSource::Host(&ws), o).expect("cuda model");
        let mut steps = vec![300, 150];
        steps.extend(std::iter::repeat_n(1, 30));
        let mut at = 0;
        for n in steps {
            let step = engine::batch::SeqStep {
                block_table: &table,
                context_len: at,
                tokens: &tokens[at..at + n],
            };
            let (a, b) = (gpu.forward(&[step]).unwrap(), cpu.forward(&[step]).unwrap());
            at += n;
            let scale = b.data.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = a
                .data
                .iter()
                .zip(&b.data)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 0.02 * scale,
                "step ending at {at}: max |diff| {diff} (scale {scale})"
            );
        }
    }

    /// The CUDA model and GPU swap engine of the shared-prefix scenario: tiny-gqa in fp16 over
    /// `GPU_BLOCKS` blocks of `BLOCK` tokens, a pinned host pool, swaps ordered after the
    /// model's stream. A poisoned block holds 0x4B4B in every fp16 element (14.6): finite,
    /// because the attention kernels read whole blocks and weigh the slots past a sequence's end
    /// by zero (the pool is zeroed at start-up for the same reason: 0 x NaN would be NaN), yet
    /// far from any real K or V, so a block used after it was freed changes the logits.
    fn shared_prefix_engine(
        device: GpuDevice,
        ws: &WeightSet,
    ) -> super::shared_prefix::Engine<CudaModel, engine::swap::cuda::CudaSwapEngine> {
        use super::shared_prefix::{Engine, BLOCK, GPU_BLOCKS, HOST_BLOCKS};
        use engine::swap::cuda::{CopyMethod, CudaSwapEngine, GpuKvPoolRef, PinnedHostPool};
        let ctx = device.ctx.clone();
        let stream = device.stream.clone();
        let mut o = options(ws);
        o.block_size_tokens = BLOCK as usize;
        o.num_kv_blocks = Some(GPU_BLOCKS as usize);
        o.max_blocks_per_seq = ws.config.max_position_embeddings.div_ceil(BLOCK as usize);
        let model = CudaModel::new(device, WeightSource::Host(ws), o).expect("cuda model");
        let pool = model.kv_pool();
        let pool_ref = GpuKvPoolRef {
            base: pool.base_device_ptr(),
            block_bytes: pool.block_bytes(),
            block_count: pool.num_blocks() as u32,
        };
        let host = PinnedHostPool::new(&ctx, pool.block_bytes(), HOST_BLOCKS).expect("pinned pool");
        let swap = CudaSwapEngine::new(
            &ctx,
            pool_ref,
            host,
            Some(stream),
            CopyMethod::Batched,
            4,
            std::time::Instant::now(),
        )
        .expect("swap engine");
        Engine {
            model,
            swap,
            poison: |model, block| {
                let pool = model.kv_pool();
                unsafe {
                    cudarc::driver::result::memset_d8_sync(
                        pool.block_device_ptr(block),
                        0x4B,
                        pool.block_bytes(),
                    )
                }
                .expect("poisoning a block");
                // The memset runs on the legacy stream: finish it before a kernel reads the pool.
                cudarc::driver::result::ctx::synchronize().expect("finishing the memset");
            },
        }
    }

    #[test]
    fn shared_prefix_blocks_give_the_logits_of_unshared_execution_on_the_gpu() {
        // Two models with the same options make the same kernel and GEMM choices, so equal
        // chunks over equal KV must give equal bits, whichever physical blocks hold the KV.
        let Some(first) = open() else { return };
        let Some(second) = open() else { return };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-gqa");
        let ws = WeightSet::from_hf_dir(&dir).expect("tiny weights load");
        super::shared_prefix::run_scenario(
            shared_prefix_engine(first, &ws),
            shared_prefix_engine(second, &ws),
        );
        println!("shared prefix on the GPU: logits bit-identical to unshared execution");
    }

    #[test]
    fn kv_demand_beyond_the_card_is_refused_at_start_up() {
        let Some(device) = open() else { return };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-gqa");
        let ws = WeightSet::from_hf_dir(&dir).expect("tiny weights load");
        let mut o = options(&ws);
        o.num_kv_blocks = None;
        o.kv_demand = Some(engine::cuda::KvDemand {
            sequences: 1 << 40,
            tokens_per_sequence: 512,
        });
        let err = match CudaModel::new(device, WeightSource::Host(&ws), o) {
            Ok(_) => panic!("a KV demand of 2^40 sequences was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("KV for") && err.contains("sequences of 512 tokens"),
            "{err}"
        );
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_forward_checks() {
    println!("skipping the CUDA forward checks: built without the `cuda` feature");
}
