//! `djinn profiles`: the shipped models, cards and profiles, and the KV pool each (model, card)
//! pair leaves, so a choice of `--model`/`--card`/`--profile` starts from what exists.

use anyhow::Result;
use clap::Args;
use sim::experiment::SimConfig;
use sim::PolicyKind;

use calibration::catalog::{SHIPPED_CARDS, SHIPPED_MODELS};

#[derive(Args, Debug)]
pub struct ProfilesArgs {
    /// GPU memory share of the pool table, as simulate's --gpu-memory-utilization.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
}

const GIB: f64 = (1u64 << 30) as f64;

pub fn run(args: ProfilesArgs) -> Result<()> {
    if !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0) {
        anyhow::bail!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            args.gpu_memory_utilization
        );
    }
    let models: Vec<_> = SHIPPED_MODELS
        .iter()
        .map(|(n, _, _)| calibration::load_model(n))
        .collect::<Result<_, _>>()?;
    let cards: Vec<_> = SHIPPED_CARDS
        .iter()
        .map(|(n, _, _)| calibration::load_card(n))
        .collect::<Result<_, _>>()?;
    println!("models (--model; calibration/models/):");
    println!(
        "  {:<12} {:>6} {:>6} {:>8} {:>8} {:>12} {:>8} {:>9} {:>5}",
        "name",
        "layers",
        "heads",
        "kv heads",
        "head dim",
        "KV B/token",
        "params",
        "context",
        "dtype"
    );
    for m in &models {
        println!(
            "  {:<12} {:>6} {:>6} {:>8} {:>8} {:>12} {:>7.2}B {:>9} {:>5}",
            m.name,
            m.layers,
            m.heads,
            m.kv_heads,
            m.head_dim,
            m.kv_bytes_per_token(),
            m.parameters() as f64 / 1e9,
            m.max_context_tokens,
            m.dtype.name()
        );
    }
    println!("cards (--card; calibration/cards/): figure used (specification sheet)");
    println!(
        "  {:<9} {:>16} {:>18} {:>18} {:>22}  {:<10} link",
        "name",
        "memory GiB",
        "bandwidth TB/s",
        "dense TFLOP/s",
        "host link GB/s each way",
        "figures"
    );
    for c in &cards {
        let p = calibration::derive::derive_profile(&models[0], c);
        let used_spec =
            |used: f64, spec: f64, unit: f64| format!("{:.2} ({:.2})", used / unit, spec / unit);
        println!(
            "  {:<9} {:>16} {:>18} {:>18} {:>22}  {:<10} {}",
            c.name,
            used_spec(p.gpu_memory_bytes as f64, c.memory_bytes.spec, GIB),
            used_spec(
                p.cost.memory_bandwidth_bytes_per_s,
                c.memory_bandwidth_bytes_per_s.spec,
                1e12
            ),
            used_spec(p.cost.matmul_flops_per_s, c.dense_flops_per_s.spec, 1e12),
            used_spec(
                p.host_to_device.bandwidth_bytes_per_s,
                c.host_to_device.spec,
                1e9
            ),
            if c.fully_measured() {
                "measured"
            } else {
                "UNMEASURED"
            },
            c.host_link
        );
    }
    println!(
        "GPU KV pool of each pair, tokens (memory x {} - weights - workspace; --model M --card C):",
        args.gpu_memory_utilization
    );
    print!("  {:<12}", "model");
    for c in &cards {
        print!(" {:>12}", c.name);
    }
    println!();
    for m in &models {
        print!("  {:<12}", m.name);
        for c in &cards {
            let cell = match calibration::catalog::derive_checked(m, c) {
                Ok(profile) => {
                    let mut config = SimConfig::new(PolicyKind::Djinn, profile);
                    config.gpu_memory_utilization = args.gpu_memory_utilization;
                    let tokens = config.gpu_blocks() as u64 * config.block_size_tokens as u64;
                    tokens.to_string()
                }
                Err(_) => "does not fit".to_string(),
            };
            print!(" {cell:>12}");
        }
        println!();
    }
    println!("shipped profiles (--profile; calibration/profiles/):");
    for (name, _, _) in calibration::SHIPPED_PROFILES {
        let p = calibration::load_profile(name)?;
        println!(
            "  {:<22} {:<8} model {:<10} on {} ({}){}",
            name,
            p.provenance.kind,
            p.model_name,
            p.gpu_name,
            p.name,
            if name == calibration::DEFAULT_PROFILE {
                ", the default"
            } else {
                ""
            }
        );
    }
    Ok(())
}
