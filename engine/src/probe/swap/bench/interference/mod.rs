//! The interference probe (`djinn engine swap-bench --interference-rounds N`): why swap-in
//! costs a decode step more than swap-out, and what the step's slowdown is at the operating
//! points a scheduler can choose.
//!
//! A victim (the synthetic HBM reader, then the CUDA engine's decode step) runs alone and beside
//! one aggressor at a time; every arm alternates quiet and busy phases twice (as
//! `decode_slowdown` does), and the list of arms is repeated `rounds` times in the same order so
//! slow drift and run-to-run noise (~1 point) show up as spread between rounds.
//!
//! Aggressors (`aggressor.rs`):
//! - swap-engine loads (DMA swap-out, swap-in, both, with per-direction rate caps);
//! - an SM kernel of few CTAs at the lowest stream priority writing (or reading) whole 128-byte
//!   lines of HBM at a paced rate, data from registers (no source traffic at all): HBM write
//!   traffic without the copy engine;
//! - raw DMA: device->device copies paced like the swap pacer, and host->device copies with the
//!   destination aligned or offset by 16 bytes;
//! - a staged swap-in: DMA host->device into a small device ring, and a copy kernel moving each
//!   staged piece into its destination with whole-line stores (the ring should stay in L2, so HBM
//!   sees only the kernel's writes), optionally with an L2 persisting access-policy window on
//!   the ring.
//!
//! Arm sets ([`ArmSet`]) choose which aggressors run. Results and what they mean:
//! docs/engine-swap.md.

use serde::Serialize;

use super::decode::{load, EngineDecode, SyntheticDecode};
use super::floors::Floors;
use super::transfers::SwapTraffic;
use super::{SwapBenchError, SwapBenchRow};
use crate::cuda::{CudaModel, GpuDevice};
use crate::probe::swap::{min_of, percentile_50};
use crate::swap::cuda::CudaSwapEngine;
use crate::swap::SwapDirection;

mod aggressor;

use aggressor::{
    scratch_of, set_persisting, Aggressor, Kit, Moved, Running, Scratch, LINE_CHUNK_BYTES,
};

/// A named list of interference arms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArmSet {
    /// Each swap direction alone, SM line writers and readers, paced device->device DMA, raw
    /// host->device DMA aligned and offset, and the staged swap-in (at ~the H2D floor's rate).
    Probe,
    /// The same write rate smoothly and in 1 or 16 MiB bursts, and large device->device copies.
    Burst,
    /// Each direction alone, both, and swap-in capped at 40/30/20 GB/s (engine victim only).
    Operating,
    /// The same with swap-in caps 40/37/34/30/25/20 GB/s (engine victim only).
    OperatingFine,
    /// Both at full speed and swap-in capped at 36/34/32 GB/s, around the 5% crossing (engine
    /// victim only).
    Crossing,
}

impl ArmSet {
    /// Sets about the engine's real step at the scheduler's operating points; the synthetic
    /// stand-in skips them.
    fn engine_only(self) -> bool {
        matches!(
            self,
            ArmSet::Operating | ArmSet::OperatingFine | ArmSet::Crossing
        )
    }

    fn arms(self, in_gb_per_s: f64) -> Vec<Aggressor> {
        match self {
            ArmSet::Probe => probe_arms(in_gb_per_s),
            ArmSet::Burst => burst_arms(),
            ArmSet::Operating => operating_points(&[40.0, 30.0, 20.0]),
            ArmSet::OperatingFine => operating_points(&[40.0, 37.0, 34.0, 30.0, 25.0, 20.0]),
            ArmSet::Crossing => operating_points(&[36.0, 34.0, 32.0])
                .into_iter()
                .skip(2)
                .collect(),
        }
    }
}

/// The victim's quiet and busy step times and what the aggressor moved, for one arm.
struct ArmResult {
    quiet_ms: Vec<f64>,
    busy_ms: Vec<f64>,
    moved: Vec<(String, Moved)>,
}

fn measure_arm(
    engine: &mut CudaSwapEngine,
    running: &mut Running,
    steps: usize,
    mut step: impl FnMut() -> Result<f64, SwapBenchError>,
) -> Result<ArmResult, SwapBenchError> {
    for _ in 0..3 {
        step()?;
    }
    let mut quiet_ms = Vec::new();
    let mut busy_ms = Vec::new();
    let mut moved: Vec<(String, Moved)> = Vec::new();
    for _phase in 0..2 {
        for _ in 0..steps {
            quiet_ms.push(step()?);
        }
        running.top_up(engine)?;
        // Let the aggressor reach its rate before timing.
        std::thread::sleep(std::time::Duration::from_millis(5));
        for _ in 0..steps {
            running.top_up(engine)?;
            busy_ms.push(step()?);
        }
        for (name, m) in running.drain(engine)? {
            match moved.iter_mut().find(|(n, _)| *n == name) {
                Some((_, total)) => total.add(m),
                None => moved.push((name, m)),
            }
        }
    }
    Ok(ArmResult {
        quiet_ms,
        busy_ms,
        moved,
    })
}

/// The aggressor arms run beside each victim.
fn probe_arms(in_gb_per_s: f64) -> Vec<Aggressor> {
    // The SM and device-copy aggressors move bytes at the H2D floor rounded down, so per byte
    // they compare with a full-speed swap-in.
    let rate = (in_gb_per_s.floor()).clamp(10.0, 60.0);
    vec![
        Aggressor::Swaps {
            load: load(2, false, true),
            out_cap: None,
            in_cap: None,
        },
        Aggressor::Swaps {
            load: load(2, true, false),
            out_cap: None,
            in_cap: None,
        },
        Aggressor::Lines {
            write: true,
            ctas: 2,
            gb_per_s: rate,
            burst: LINE_CHUNK_BYTES,
        },
        Aggressor::Lines {
            write: true,
            ctas: 2,
            gb_per_s: (rate / 2.0).round(),
            burst: LINE_CHUNK_BYTES,
        },
        Aggressor::Lines {
            write: false,
            ctas: 2,
            gb_per_s: rate,
            burst: LINE_CHUNK_BYTES,
        },
        Aggressor::DeviceCopyPaced {
            piece: 16 << 20,
            gb_per_s: rate,
        },
        Aggressor::HostCopy { dst_offset: 0 },
        Aggressor::HostCopy { dst_offset: 16 },
        Aggressor::Staged {
            slots: 4,
            piece: 4 << 20,
            ctas: 2,
            persisting: false,
        },
        Aggressor::Staged {
            slots: 4,
            piece: 1 << 20,
            ctas: 2,
            persisting: false,
        },
        Aggressor::Staged {
            slots: 4,
            piece: 4 << 20,
            ctas: 2,
            persisting: true,
        },
    ]
}

/// Whether HBM writes cost less per byte when they come in bursts (a memory controller drains
/// its write queue in batches; each switch between reading and writing costs bus time, so dense
/// bursts amortise it): the same average rate smoothly and in 16 MiB bursts, and device->device
/// DMA in large paced pieces.
fn burst_arms() -> Vec<Aggressor> {
    const RATE: f64 = 48.0;
    vec![
        Aggressor::Lines {
            write: true,
            ctas: 2,
            gb_per_s: RATE,
            burst: LINE_CHUNK_BYTES,
        },
        Aggressor::Lines {
            write: true,
            ctas: 16,
            gb_per_s: RATE,
            burst: LINE_CHUNK_BYTES,
        },
        Aggressor::Lines {
            write: true,
            ctas: 16,
            gb_per_s: RATE,
            burst: 16 << 20,
        },
        Aggressor::Lines {
            write: true,
            ctas: 16,
            gb_per_s: RATE,
            burst: 1 << 20,
        },
        Aggressor::DeviceCopyPaced {
            piece: 64 << 20,
            gb_per_s: RATE,
        },
    ]
}

/// Operating points a scheduler can choose: each direction alone at full speed, both at full
/// speed, and swap-in paced while swap-out runs at full speed.
fn operating_points(in_caps_gb_per_s: &[f64]) -> Vec<Aggressor> {
    let mut arms = vec![
        Aggressor::Swaps {
            load: load(2, false, true),
            out_cap: None,
            in_cap: None,
        },
        Aggressor::Swaps {
            load: load(2, true, false),
            out_cap: None,
            in_cap: None,
        },
        Aggressor::Swaps {
            load: load(2, true, true),
            out_cap: None,
            in_cap: None,
        },
    ];
    for &cap in in_caps_gb_per_s {
        arms.push(Aggressor::Swaps {
            load: load(2, true, true),
            out_cap: None,
            in_cap: Some(cap),
        });
    }
    arms
}

/// What runs on the compute stream and is timed.
trait Victim {
    fn device(&self) -> &GpuDevice;
    /// One step, in ms.
    fn step(&mut self) -> Result<f64, SwapBenchError>;
}

struct SyntheticVictim<'a> {
    device: &'a GpuDevice,
    synthetic: SyntheticDecode,
}

impl Victim for SyntheticVictim<'_> {
    fn device(&self) -> &GpuDevice {
        self.device
    }
    fn step(&mut self) -> Result<f64, SwapBenchError> {
        self.synthetic.step()
    }
}

struct EngineVictim<'a> {
    model: &'a mut CudaModel,
    decode: &'a mut EngineDecode,
}

impl Victim for EngineVictim<'_> {
    fn device(&self) -> &GpuDevice {
        &self.model.device
    }
    fn step(&mut self) -> Result<f64, SwapBenchError> {
        self.decode.step(self.model)
    }
}

/// Runs every arm `rounds` times beside one victim; one row per arm and round, then one summary
/// row per arm (median slowdown over rounds, and the spread).
#[allow(clippy::too_many_arguments)]
fn run_victim(
    victim_name: &str,
    victim: &mut dyn Victim,
    engine: &mut CudaSwapEngine,
    traffic: &SwapTraffic,
    scratch: Scratch,
    arms: &[Aggressor],
    rounds: usize,
    steps: usize,
    step_bytes: u64,
    push: &mut dyn FnMut(SwapBenchRow),
) -> Result<(), SwapBenchError> {
    let kit = Kit::new(victim.device())?;
    let mut slowdowns: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    let mut notes: Vec<String> = vec![String::new(); arms.len()];
    for round in 0..rounds {
        for (a, aggressor) in arms.iter().enumerate() {
            if let Aggressor::Swaps {
                out_cap, in_cap, ..
            } = aggressor
            {
                engine.set_direction_rate_cap(victim.device(), SwapDirection::Out, *out_cap)?;
                engine.set_direction_rate_cap(victim.device(), SwapDirection::In, *in_cap)?;
            }
            let persisting = matches!(
                aggressor,
                Aggressor::Staged {
                    persisting: true,
                    ..
                }
            );
            if persisting {
                if let Err(why) = set_persisting(&kit, true) {
                    notes[a] = format!("skipped: {why}");
                    let _ = set_persisting(&kit, false);
                    continue;
                }
            }
            let mut running = Running::new(&kit, scratch, aggressor, traffic)?;
            let result = measure_arm(engine, &mut running, steps, || victim.step());
            if persisting {
                set_persisting(&kit, false).map_err(|why| SwapBenchError::Driver {
                    during: "removing the L2 persisting window",
                    detail: why,
                })?;
            }
            engine.set_rate_cap(victim.device(), None)?;
            let result = result?;
            let quiet = percentile_50(&result.quiet_ms);
            let busy = percentile_50(&result.busy_ms);
            let slowdown = busy / quiet - 1.0;
            slowdowns[a].push(slowdown);
            let moved = result
                .moved
                .iter()
                .map(|(n, m)| format!("{n}: {}", m.describe()))
                .collect::<Vec<_>>()
                .join("; ");
            notes[a] = moved.clone();
            push(SwapBenchRow {
                section: "interference".into(),
                name: format!(
                    "{victim_name} | {} | round {}",
                    aggressor.label(),
                    round + 1
                ),
                bytes: step_bytes,
                ms_p50: busy,
                ms_min: min_of(&result.busy_ms),
                reps: result.busy_ms.len(),
                gb_per_s: step_bytes as f64 / (busy * 1e6),
                floor: quiet,
                floor_what: "ms p50 of the same step without the aggressor (same arm)".into(),
                ratio: busy / quiet,
                target: "<= 5% slower".into(),
                meets_target: Some(slowdown <= 0.05),
                note: format!("slowdown {:+.2}%; {moved}", slowdown * 100.0),
            });
        }
    }
    for (a, aggressor) in arms.iter().enumerate() {
        let s = &slowdowns[a];
        if s.is_empty() {
            push(SwapBenchRow {
                section: "interference summary".into(),
                name: format!("{victim_name} | {}", aggressor.label()),
                bytes: step_bytes,
                ms_p50: f64::NAN,
                ms_min: f64::NAN,
                reps: 0,
                gb_per_s: f64::NAN,
                floor: f64::NAN,
                floor_what: "-".into(),
                ratio: f64::NAN,
                target: "<= 5% slower".into(),
                meets_target: None,
                note: notes[a].clone(),
            });
            continue;
        }
        let median = percentile_50(s);
        let lo = s.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        push(SwapBenchRow {
            section: "interference summary".into(),
            name: format!("{victim_name} | {}", aggressor.label()),
            bytes: step_bytes,
            ms_p50: f64::NAN,
            ms_min: f64::NAN,
            reps: s.len(),
            gb_per_s: f64::NAN,
            floor: 1.0,
            floor_what: "slowdown ratio 1.0 = no slowdown".into(),
            ratio: 1.0 + median,
            target: "<= 5% slower".into(),
            meets_target: Some(median <= 0.05),
            note: format!(
                "median slowdown over {} rounds {:+.2}% (min {:+.2}%, max {:+.2}%); last round: {}",
                s.len(),
                median * 100.0,
                lo * 100.0,
                hi * 100.0,
                notes[a]
            ),
        });
    }
    Ok(())
}

/// The arms of the sets, in order.
fn arms_of(sets: &[ArmSet], in_gb_per_s: f64) -> Vec<Aggressor> {
    sets.iter().flat_map(|set| set.arms(in_gb_per_s)).collect()
}

/// Context the bench's `run` hands over (its device, pools and options).
pub(super) struct InterferenceSetup<'a> {
    pub sets: &'a [ArmSet],
    pub rounds: usize,
    pub steps: usize,
    pub floors: &'a Floors,
    pub step_bytes: u64,
}

/// The synthetic victim over the bench's own pool: `engine` is the bench's swap engine.
pub(super) fn synthetic_victim(
    setup: &InterferenceSetup,
    device: &GpuDevice,
    engine: &mut CudaSwapEngine,
    traffic: &SwapTraffic,
    push: &mut dyn FnMut(SwapBenchRow),
) -> Result<(), SwapBenchError> {
    let scratch = scratch_of(
        engine.gpu_pool(),
        0,
        engine.gpu_pool().block_count,
        engine.host_pool(),
    );
    // Operating points are about the engine's real step; the stand-in runs the other sets.
    let synthetic_sets: Vec<ArmSet> = setup
        .sets
        .iter()
        .copied()
        .filter(|set| !set.engine_only())
        .collect();
    let mut victim = SyntheticVictim {
        device,
        synthetic: SyntheticDecode::new(device, setup.step_bytes)?,
    };
    run_victim(
        "synthetic HBM reader (stand-in)",
        &mut victim,
        engine,
        traffic,
        scratch,
        &arms_of(&synthetic_sets, setup.floors.in_gb_per_s),
        setup.rounds,
        setup.steps,
        setup.step_bytes,
        push,
    )
}

/// The engine's decode step as the victim: the probe's arms, then the operating points.
#[allow(clippy::too_many_arguments)]
pub(super) fn engine_victim(
    setup: &InterferenceSetup,
    model: &mut CudaModel,
    engine: &mut CudaSwapEngine,
    traffic: &SwapTraffic,
    first_swap_block: u32,
    swap_blocks: u32,
    decode: &mut EngineDecode,
    push: &mut dyn FnMut(SwapBenchRow),
) -> Result<(), SwapBenchError> {
    let scratch = scratch_of(
        engine.gpu_pool(),
        first_swap_block,
        swap_blocks,
        engine.host_pool(),
    );
    let arms = arms_of(setup.sets, setup.floors.in_gb_per_s);
    let mut victim = EngineVictim { model, decode };
    run_victim(
        "engine decode (llama2-7b fp16, batch 32, ctx 2048, graph, forward_greedy)",
        &mut victim,
        engine,
        traffic,
        scratch,
        &arms,
        setup.rounds,
        setup.steps,
        setup.step_bytes,
        push,
    )
}
