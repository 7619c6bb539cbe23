//! What `djinn engine run` checks before any engine is built: its flags, the workload, the
//! model, the profile and the results folder.

use anyhow::{bail, Context, Result};
use engine::config::ModelConfig;
use sim::driver::{CheckLevel, RunLimits};
use sim::experiment::SimConfig;
use sim::time::SimTime;
use sim::workload::Workload;
use sim::PolicyKind;
use traces::WorkloadSpec;

use super::{EngineBackendKind, RunArgs, SwapInCopy};
use crate::runio::inputs::{check_expected, Input};
use crate::runio::load_workload_with_inputs;
use crate::runio::outdir::check_new_folder;
use crate::runio::profile_args::{resolve, PartNames, ResolvedProfile, FLAGS};
use calibration::ProfileChoice;

/// Validated inputs.
pub struct RunPlan {
    pub spec: WorkloadSpec,
    pub agents: u32,
    pub workload: Workload,
    pub policies: Vec<PolicyKind>,
    /// Profile, predictor, block size, batch limits (pool sizes come from the engine).
    pub base: SimConfig,
    pub model_config: ModelConfig,
    pub model_label: String,
    /// The workload and profile files read, hashed (for the reproduce line).
    pub inputs: Vec<Input>,
}

/// What the engine was built with (for manifests and tables).
pub struct EngineInfo {
    pub backend: &'static str,
    pub device: String,
    pub block_bytes: u64,
    pub kv_bytes_per_token: u64,
    pub gpu_blocks: u32,
    pub host_blocks: u32,
    /// Start-up notes printed and written to the manifest (pin time, memory breakdown).
    pub notes: Vec<(String, String)>,
}

pub const GIB: f64 = (1u64 << 30) as f64;

/// Checks every flag, loads the workload, model config and profile, and checks the results
/// folder, all before any engine is built.
pub fn validate(args: &RunArgs) -> Result<RunPlan> {
    check_expected(&args.expect_sha256)?;
    let (spec, mut inputs) = load_workload_with_inputs(&args.workload)?;
    let policies = crate::runio::parse_policies(&args.policies, &[PolicyKind::Djinn])?;
    check_flags(args)?;
    let (model_config, model_label) = model_config(args)?;
    if spec.max_context_tokens as usize > model_config.max_position_embeddings {
        bail!(
            "workload `{}` allows contexts of {} tokens but model {} has {} positions",
            spec.name,
            spec.max_context_tokens,
            model_config.name,
            model_config.max_position_embeddings
        );
    }
    let agents = spec.agent_count(args.agents);
    let workload = sim::replay::build_workload(&spec, agents, args.seed)?;
    let twin = twin_profile(args)?;
    let profile = twin.profile;
    inputs.extend(twin.inputs);
    let mut base = SimConfig::new(PolicyKind::Djinn, profile);
    base.seed = args.seed;
    base.block_size_tokens = args.block_size;
    base.sched.max_batch_tokens = args.max_batch_tokens;
    base.sched.max_batch_sequences = args.max_batch_sequences;
    base.predictor = sim::policies::PredictorMode::parse(&args.predictor).context("--predictor")?;
    base.check = CheckLevel::Step {
        audit_interval_steps: 256,
    };
    base.limits = RunLimits {
        max_sim_time: SimTime::from_secs_f64(args.time_limit_s),
        ..RunLimits::default()
    };
    if !args.no_write {
        check_new_folder(&args.out.join(&spec.name), args.overwrite)?;
    }
    Ok(RunPlan {
        spec,
        agents,
        workload,
        policies,
        base,
        model_config,
        model_label,
        inputs,
    })
}

/// Range checks of the numeric and backend-specific flags.
fn check_flags(args: &RunArgs) -> Result<()> {
    crate::runio::check_agents_flag(args.agents)?;
    for (flag, value) in [
        ("--gpu-kv-gib", args.gpu_kv_gib),
        ("--host-kv-gib", args.host_kv_gib),
    ] {
        if let Some(v) = value {
            if !(v.is_finite() && v > 0.0 && v <= 65536.0) {
                bail!("{flag} must be a number in (0, 65536], got {v}");
            }
        }
    }
    for (flag, value) in [
        ("--gpu-kv-blocks", args.gpu_kv_blocks),
        ("--host-kv-blocks", args.host_kv_blocks),
    ] {
        if value == Some(0) {
            bail!("{flag} must be at least 1");
        }
    }
    if args.block_size == 0 || args.block_size > 256 {
        bail!("--block-size must be in 1..=256, got {}", args.block_size);
    }
    if args.max_batch_tokens == 0 || args.max_batch_tokens > 65536 {
        bail!(
            "--max-batch-tokens must be in 1..=65536, got {}",
            args.max_batch_tokens
        );
    }
    if args.max_batch_sequences == 0 || args.max_batch_sequences > 1024 {
        bail!(
            "--max-batch-sequences must be in 1..=1024, got {}",
            args.max_batch_sequences
        );
    }
    if !(args.slo_ms.is_finite() && args.slo_ms > 0.0) {
        bail!("--slo-ms must be a finite number > 0, got {}", args.slo_ms);
    }
    if !(args.time_limit_s.is_finite() && args.time_limit_s > 0.0) {
        bail!(
            "--time-limit-s must be a finite number > 0, got {}",
            args.time_limit_s
        );
    }
    if args.backend == EngineBackendKind::Cpu && args.swap_in_copy != SwapInCopy::Dma {
        bail!("--swap-in-copy kernel needs --backend cuda");
    }
    for (flag, cap) in [
        ("--swap-rate-cap-gbps", args.swap_rate_cap_gbps),
        ("--swap-in-rate-cap-gbps", args.swap_in_rate_cap_gbps),
        ("--swap-out-rate-cap-gbps", args.swap_out_rate_cap_gbps),
    ] {
        if let Some(cap) = cap {
            if !(cap.is_finite() && cap > 0.0) {
                bail!("{flag} must be a finite number of GB/s > 0, got {cap}");
            }
            if args.backend == EngineBackendKind::Cpu {
                bail!("{flag} needs --backend cuda");
            }
        }
    }
    Ok(())
}

/// The model the engine runs: a preset with random weights, or `--weights`; and its label.
/// The simulated twin's profile: --profile, or the engine's model derived on --card.
fn twin_profile(args: &RunArgs) -> Result<ResolvedProfile> {
    let Some(card) = &args.card else {
        let choice = ProfileChoice {
            profile: Some(&args.profile),
            ..ProfileChoice::default()
        };
        return resolve(choice, &FLAGS);
    };
    let model = args.model.as_deref().unwrap_or(match args.backend {
        EngineBackendKind::Cuda => "llama2-7b",
        EngineBackendKind::Cpu => "tiny",
    });
    let choice = ProfileChoice {
        profile: None,
        model: Some(model),
        card: Some(card),
    };
    let names = PartNames {
        model: "--model (with --card, a model description is needed for the twin profile)",
        ..FLAGS
    };
    resolve(choice, &names)
}

fn model_config(args: &RunArgs) -> Result<(ModelConfig, String)> {
    let (model_config, model_label) = match (&args.weights, &args.model) {
        (Some(path), _) => (weights_config(path)?, path.display().to_string()),
        (None, model) => {
            let name = model.clone().unwrap_or_else(|| {
                match args.backend {
                    EngineBackendKind::Cuda => "llama2-7b",
                    EngineBackendKind::Cpu => "tiny",
                }
                .to_string()
            });
            let config = ModelConfig::preset(&name).with_context(|| {
                format!(
                    "unknown model preset `{name}` (known: {})",
                    ModelConfig::PRESET_NAMES.join(", ")
                )
            })?;
            (
                config,
                format!("{name} (random weights, seed {})", args.seed),
            )
        }
    };
    if args.backend == EngineBackendKind::Cpu && args.weights.is_none() {
        let params = engine::weights::WeightSet::expected_shapes(&model_config)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum::<usize>();
        if params > 1 << 30 {
            bail!(
                "--model {} has {:.1} B parameters: too large for the CPU backend's f32 reference forward; use --backend cuda or a tiny model",
                model_config.name,
                params as f64 / 1e9
            );
        }
    }
    Ok((model_config, model_label))
}

/// The model config of `--weights`: from `config.json` alone for an HF directory (a 7B checkpoint is
/// not read twice), else by loading the file (GGUF metadata and tensors).
fn weights_config(path: &std::path::Path) -> Result<ModelConfig> {
    let dir = if path.is_dir() {
        Some(path)
    } else {
        path.parent()
    };
    let is_gguf = path.extension().is_some_and(|ext| ext == "gguf");
    if let (false, Some(dir)) = (is_gguf, dir) {
        let config_path = dir.join("config.json");
        if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config_path.display()))?;
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "weights".into());
            return Ok(engine::weights::config_from_hf_json(
                &json,
                &config_path,
                &name,
            )?);
        }
    }
    Ok(engine::weights::WeightSet::load(path)
        .with_context(|| format!("reading the weights at {}", path.display()))?
        .config)
}

/// Blocks of a pool given in GiB or blocks.
pub fn pool_blocks(gib: Option<f64>, blocks: Option<u32>, block_bytes: u64) -> Option<u32> {
    match (gib, blocks) {
        (_, Some(b)) => Some(b),
        (Some(g), None) => Some(
            ((g * GIB) / block_bytes as f64)
                .floor()
                .min(u32::MAX as f64) as u32,
        ),
        (None, None) => None,
    }
}
