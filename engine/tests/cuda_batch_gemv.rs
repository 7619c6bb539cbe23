//! The multi-row streaming GEMV (decode steps of 2-32 rows, `--decode-gemm gemv`) against cuBLAS:
//! the kernel on Llama-3.1-8B's shapes, an odd row count and an inner size off the 32-element
//! groups, in bf16 and fp16, every output kind and the fused gate_up + SiLU-mul; then decode
//! steps of a random model whose linear layers run on it, logits against the cuBLAS path. Run for
//! real where a GPU exists, skipped with the reason printed where none does (CI).

#[cfg(feature = "cuda")]
mod gpu {
    use engine::config::{DType, ModelConfig};
    use engine::cuda::{CudaModel, CudaModelOptions, DecodeGemm, GpuDevice, WeightSource};
    use engine::probe::forward::batch_gemv::{self, CHECK_ROWS, LLAMA3_8B_SHAPES};
    use engine::weights::WeightSet;

    fn open() -> Option<GpuDevice> {
        match GpuDevice::open(0) {
            Ok(device) => Some(device),
            Err(why) => {
                println!("skipping the multi-row GEMV checks: {why}");
                None
            }
        }
    }

    /// A random model whose GEMMs run whole and partial stages of the kernel's weight stream:
    /// hidden 1024 (8 query heads of 128 over 2 KV heads), MLP 2824 (down_proj's k ends in a
    /// partial 32-element group), 2 layers, vocab 1000 (the LM head's n is no multiple of 16).
    fn model(device: GpuDevice, dtype: DType, seats: usize) -> CudaModel {
        let mut config = ModelConfig::tiny_gqa();
        config.name = "batch-gemv-check".into();
        config.hidden_size = 1024;
        config.num_attention_heads = 8;
        config.num_key_value_heads = 2;
        config.intermediate_size = 2824;
        config.vocab_size = 1000;
        let ws = WeightSet::random(&config, 17);
        let mut o = CudaModelOptions::for_config(&config);
        o.dtype = dtype;
        o.num_kv_blocks = Some(2 * seats + 8);
        o.max_tokens_per_step = 32 * seats;
        o.max_seqs_per_step = seats;
        CudaModel::new(device, WeightSource::Host(&ws), o).expect("cuda model")
    }

    #[test]
    fn kernel_matches_cublas_on_llama3_8b_shapes() {
        for dtype in [DType::Bf16, DType::F16] {
            let Some(device) = open() else { return };
            let m = model(device, dtype, 8);
            let results =
                batch_gemv::kernel_checks(&m, &LLAMA3_8B_SHAPES, &CHECK_ROWS, 0x5eed).expect("ran");
            assert!(!results.is_empty());
            let failed: Vec<_> = results.iter().filter(|c| !c.passed()).collect();
            let worst = results
                .iter()
                .map(|c| c.max_abs_diff / c.ref_max_abs.max(1e-3) / c.tolerance_rel)
                .fold(0f32, f32::max);
            println!(
                "{dtype:?}: {} comparisons, worst at {worst:.3} of its bound",
                results.len()
            );
            assert!(failed.is_empty(), "{dtype:?}: {failed:#?}");
        }
    }

    #[test]
    fn decode_steps_on_the_multi_row_gemv_match_cublas() {
        for dtype in [DType::Bf16, DType::F16] {
            let Some(device) = open() else { return };
            let mut m = model(device, dtype, 32);
            let results = batch_gemv::decode_checks(&mut m, &[2, 5, 8, 17, 32], 0.02).expect("ran");
            assert_eq!(m.decode_gemm(), DecodeGemm::Cublas, "choice restored");
            for (check, diff, ok) in &results {
                println!("{dtype:?} {check}: max |diff| {diff:.3e}");
                assert!(ok, "{dtype:?} {check}: max |diff| {diff}");
            }
        }
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_batch_gemv_checks() {
    println!("skipping the multi-row GEMV checks: built without the `cuda` feature");
}
