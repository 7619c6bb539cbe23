//! How `djinn calibrate validate-suite` shrinks a workload to fit a time budget on the card:
//! token counts, turns per agent and time (arrivals and pauses) each multiplied by a factor,
//! keeping the workload's shape (its distributions' forms and mixture weights) unchanged.

use anyhow::{bail, Result};
use traces::workload::{Arrival, Distribution, MixtureComponent};
use traces::WorkloadSpec;

/// Factors applied to a workload; 1 leaves that part as shipped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scale {
    /// Every token count (prompts, new tokens, generated tokens) and the context window.
    pub tokens: f64,
    /// Turns per agent (synthetic agent programs; a replayed trace keeps its sessions' turns).
    pub turns: f64,
    /// Arrival times and pauses: 0.1 runs the same programs in a tenth of the wall time.
    pub time: f64,
}

impl Scale {
    pub const IDENTITY: Scale = Scale {
        tokens: 1.0,
        turns: 1.0,
        time: 1.0,
    };
}

/// Turns per agent are never scaled below this (unless they were below it): a program of two or
/// more turns keeps its pause and return, the shape the suite is there to validate.
const TURNS_FLOOR: f64 = 2.0;

/// `d` with every value it can draw multiplied by `f` (same form, same weights), except that a
/// parameter is not taken below `floor` unless it already was.
fn scale_dist(d: &Distribution, f: f64, floor: f64) -> Distribution {
    let v = |x: f64| (x * f).max(x.min(floor));
    match d {
        Distribution::Constant { value } => Distribution::Constant { value: v(*value) },
        Distribution::Uniform { low, high } => Distribution::Uniform {
            low: v(*low),
            high: v(*high),
        },
        Distribution::Exponential { mean } => Distribution::Exponential { mean: v(*mean) },
        // The spread `sigma` is of log(x), which scaling shifts but does not widen.
        Distribution::LogNormal {
            median,
            sigma,
            p90,
            max,
        } => Distribution::LogNormal {
            median: v(*median),
            sigma: *sigma,
            p90: p90.map(v),
            max: max.map(v),
        },
        Distribution::Mixture { components } => Distribution::Mixture {
            components: components
                .iter()
                .map(|c| MixtureComponent {
                    weight: c.weight,
                    dist: scale_dist(&c.dist, f, floor),
                })
                .collect(),
        },
    }
}

/// The workload `spec` scaled by `scale`; errors where a part cannot be scaled.
pub fn scaled_spec(spec: &WorkloadSpec, scale: Scale) -> Result<WorkloadSpec> {
    let mut s = spec.clone();
    if scale == Scale::IDENTITY {
        return Ok(s);
    }
    if s.background.is_some() && (scale.time != 1.0 || scale.tokens != 1.0) {
        bail!(
            "workload `{}` mixes in background requests from a trace, whose times and lengths cannot be scaled; run it with --time-scale 1 --token-scale 1 or leave it out",
            spec.name
        );
    }
    // The window shrinks with the tokens so agents' programs end at the same relative length.
    s.max_context_tokens = ((f64::from(s.max_context_tokens) * scale.tokens).round() as u32).max(1);
    match &mut s.replay {
        Some(r) => {
            r.token_scale *= scale.tokens;
            r.time_scale *= scale.time;
        }
        None => {
            let a = &mut s.agent;
            a.turns = scale_dist(&a.turns, scale.turns, TURNS_FLOOR);
            a.first_prompt_tokens = scale_dist(&a.first_prompt_tokens, scale.tokens, 0.0);
            a.new_tokens = scale_dist(&a.new_tokens, scale.tokens, 0.0);
            a.generated_tokens = scale_dist(&a.generated_tokens, scale.tokens, 0.0);
            a.pause_s = scale_dist(&a.pause_s, scale.time, 0.0);
            s.arrival = match &s.arrival {
                Arrival::Poisson { rate_per_s } => Arrival::Poisson {
                    rate_per_s: rate_per_s / scale.time,
                },
                Arrival::Ramp { ramp_s } => Arrival::Ramp {
                    ramp_s: ramp_s * scale.time,
                },
                Arrival::Explicit { times_s } => Arrival::Explicit {
                    times_s: times_s.iter().map(|t| t * scale.time).collect(),
                },
            };
        }
    }
    for g in &mut s.prefix_groups {
        g.tokens = ((f64::from(g.tokens) * scale.tokens).round() as u32).max(1);
    }
    s.description = format!(
        "{} (scaled: tokens x{}, turns x{}, time x{})",
        s.description, scale.tokens, scale.turns, scale.time
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> WorkloadSpec {
        let text = sim::experiment::shipped_workload(name).unwrap();
        WorkloadSpec::from_toml_str(std::path::Path::new(name), text).unwrap()
    }

    #[test]
    fn identity_changes_nothing_and_factors_reach_every_part() {
        let spec = shipped("seed-exp1");
        assert_eq!(scaled_spec(&spec, Scale::IDENTITY).unwrap(), spec);
        let s = scaled_spec(
            &spec,
            Scale {
                tokens: 0.125,
                turns: 0.5,
                time: 0.1,
            },
        )
        .unwrap();
        assert_eq!(s.max_context_tokens, 512);
        // Two turns stay two: the pause and return are the shape under test.
        assert_eq!(s.agent.turns, Distribution::Constant { value: 2.0 });
        assert_eq!(
            s.agent.first_prompt_tokens,
            Distribution::Constant { value: 192.0 }
        );
        assert_eq!(
            s.agent.pause_s,
            Distribution::Uniform {
                low: 1.0,
                high: 2.0
            }
        );
        assert_eq!(s.arrival, Arrival::Poisson { rate_per_s: 2.0 });
        assert_eq!(s.name, spec.name);
    }

    #[test]
    fn mixtures_keep_their_weights_and_replays_scale_through_their_own_factors() {
        let spec = shipped("coding-agent-small");
        let s = scaled_spec(
            &spec,
            Scale {
                tokens: 0.5,
                turns: 0.1,
                time: 0.5,
            },
        )
        .unwrap();
        let Distribution::Mixture { components } = &s.agent.turns else {
            panic!("turns stay a mixture")
        };
        assert_eq!(components[0].weight, 0.65);
        assert_eq!(
            components[0].dist,
            Distribution::Uniform {
                low: 2.0,
                high: 6.0
            }
        );
        assert_eq!(s.arrival, Arrival::Ramp { ramp_s: 30.0 });
        let chat = scaled_spec(
            &shipped("chat"),
            Scale {
                tokens: 0.5,
                turns: 0.1,
                time: 0.25,
            },
        )
        .unwrap();
        let r = chat.replay.unwrap();
        assert_eq!((r.token_scale, r.time_scale), (0.03125, 0.25));
        assert_eq!(chat.max_context_tokens, 2048);
    }
}
