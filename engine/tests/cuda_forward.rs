//! The CUDA forward against the CPU reference on the tiny models in tests/data, and its
//! self-consistency: run for real where a GPU exists, skipped with the reason printed where none
//! does (CI). `djinn engine check cuda-vs-cpu` / `check consistency` run the same checks.

#[cfg(feature = "cuda")]
mod gpu {
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
        for name in ["tiny", "tiny-gqa"] {
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
    fn cuda_paged_forward_is_self_consistent() {
        let Some(device) = open() else { return };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-gqa");
        let ws = WeightSet::from_hf_dir(&dir).expect("tiny weights load");
        let mut gpu =
            CudaModel::new(device, WeightSource::Host(&ws), options(&ws)).expect("cuda model");
        for (name, diff, ok) in check::self_consistency(&mut gpu, 0.02).expect("ran") {
            println!("{name}: {diff:.3e}");
            assert!(ok, "{name}: max |diff| {diff}");
        }
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_forward_checks() {
    println!("skipping the CUDA forward checks: built without the `cuda` feature");
}
