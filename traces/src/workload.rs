//! Workload specs (TOML): who arrives when, and what each agent's turns and pauses look like.
//!
//! A spec describes distributions; `sim::workload` draws concrete agent programs from it with a
//! seed. Example (the shipped `seed-exp1`):
//!
//! ```toml
//! schema_version = 1
//! name = "seed-exp1"
//! agents = 80
//! max_context_tokens = 4096
//! [arrival]
//! kind = "poisson"
//! rate_per_s = 0.2
//! [agent]
//! turns = { kind = "constant", value = 2 }
//! first_prompt_tokens = { kind = "constant", value = 1536 }
//! new_tokens = { kind = "constant", value = 512 }
//! generated_tokens = { kind = "constant", value = 128 }
//! pause_s = { kind = "uniform", low = 10.0, high = 20.0 }
//! [hint]
//! kind = "exact"
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::io::{read_text, TraceError};

/// A probability distribution over non-negative reals (tokens, seconds, counts).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Distribution {
    Constant {
        value: f64,
    },
    Uniform {
        low: f64,
        high: f64,
    },
    Exponential {
        mean: f64,
    },
    /// Log-normal given by its median and either `sigma` (of the underlying normal) or `p90`.
    LogNormal {
        median: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sigma: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        p90: Option<f64>,
        /// Optional clamp of draws (e.g. a tail cut), applied after drawing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<f64>,
    },
    Mixture {
        components: Vec<MixtureComponent>,
    },
}

/// One weighted component of a mixture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureComponent {
    pub weight: f64,
    pub dist: Distribution,
}

/// z-score of the 90th percentile of a standard normal.
pub const Z_P90: f64 = 1.281_551_565_544_600_4;

impl Distribution {
    /// Checks ranges; `field` is the dotted path used in the error message.
    pub fn validate(&self, field: &str) -> Result<(), (String, String)> {
        let finite_non_negative = |name: &str, v: f64| -> Result<(), (String, String)> {
            if !v.is_finite() || v < 0.0 {
                return Err((
                    format!("{field}.{name}"),
                    format!("must be a finite number >= 0, got {v}"),
                ));
            }
            Ok(())
        };
        let positive = |name: &str, v: f64| -> Result<(), (String, String)> {
            if !v.is_finite() || v <= 0.0 {
                return Err((
                    format!("{field}.{name}"),
                    format!("must be a finite number > 0, got {v}"),
                ));
            }
            Ok(())
        };
        match self {
            Distribution::Constant { value } => finite_non_negative("value", *value),
            Distribution::Uniform { low, high } => {
                finite_non_negative("low", *low)?;
                finite_non_negative("high", *high)?;
                if high < low {
                    return Err((
                        format!("{field}.high"),
                        format!("must be >= low ({low}), got {high}"),
                    ));
                }
                Ok(())
            }
            Distribution::Exponential { mean } => positive("mean", *mean),
            Distribution::LogNormal {
                median,
                sigma,
                p90,
                max,
            } => {
                positive("median", *median)?;
                match (sigma, p90) {
                    (Some(s), None) => finite_non_negative("sigma", *s)?,
                    (None, Some(p)) => {
                        positive("p90", *p)?;
                        if *p < *median {
                            return Err((
                                format!("{field}.p90"),
                                format!("must be >= median ({median}), got {p}"),
                            ));
                        }
                    }
                    _ => {
                        return Err((
                            field.to_string(),
                            "lognormal needs exactly one of `sigma` or `p90`".into(),
                        ))
                    }
                }
                if let Some(m) = max {
                    positive("max", *m)?;
                }
                Ok(())
            }
            Distribution::Mixture { components } => {
                if components.is_empty() {
                    return Err((format!("{field}.components"), "must not be empty".into()));
                }
                for (i, c) in components.iter().enumerate() {
                    positive(&format!("components[{i}].weight"), c.weight)?;
                    c.dist.validate(&format!("{field}.components[{i}].dist"))?;
                }
                Ok(())
            }
        }
    }

    /// The log-normal sigma implied by `sigma` or `p90`.
    pub fn lognormal_sigma(median: f64, sigma: Option<f64>, p90: Option<f64>) -> f64 {
        match (sigma, p90) {
            (Some(s), _) => s,
            (None, Some(p)) => (p / median).ln() / Z_P90,
            (None, None) => 0.0,
        }
    }

    /// Expected value (used for reporting and sanity checks, not for sampling).
    pub fn mean(&self) -> f64 {
        match self {
            Distribution::Constant { value } => *value,
            Distribution::Uniform { low, high } => (low + high) / 2.0,
            Distribution::Exponential { mean } => *mean,
            Distribution::LogNormal {
                median, sigma, p90, ..
            } => {
                let s = Self::lognormal_sigma(*median, *sigma, *p90);
                median * (s * s / 2.0).exp()
            }
            Distribution::Mixture { components } => {
                let total: f64 = components.iter().map(|c| c.weight).sum();
                components
                    .iter()
                    .map(|c| c.weight / total * c.dist.mean())
                    .sum()
            }
        }
    }
}

/// How agents arrive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Arrival {
    /// Open loop: exponential inter-arrival times at `rate_per_s`, first agent at time 0.
    Poisson { rate_per_s: f64 },
    /// Closed loop: all agents start uniformly at random within `ramp_s` seconds.
    Ramp { ramp_s: f64 },
    /// Explicit start times in seconds (the agent count is their number).
    Explicit { times_s: Vec<f64> },
}

/// What the scheduler is told about a pause's length.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", try_from = "HintSpecFields")]
pub enum HintSpec {
    /// The true pause.
    Exact,
    /// `true * exp(N(0, sigma^2))`.
    Noisy { sigma: f64 },
    /// No hint; a policy must predict.
    None,
}

/// The fields a `[hint]` table may have; `HintSpec` is read through it. serde's internally tagged
/// enums ignore unknown fields of unit variants (`exact`, `none`) even with
/// `deny_unknown_fields`, so `kind = "exact"` with a misspelt key was silently accepted (found by
/// the robust-input tests).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HintSpecFields {
    kind: String,
    #[serde(default)]
    sigma: Option<f64>,
}

impl TryFrom<HintSpecFields> for HintSpec {
    type Error = String;

    fn try_from(fields: HintSpecFields) -> Result<Self, String> {
        match (fields.kind.as_str(), fields.sigma) {
            ("exact", None) => Ok(HintSpec::Exact),
            ("none", None) => Ok(HintSpec::None),
            ("noisy", Some(sigma)) => Ok(HintSpec::Noisy { sigma }),
            ("noisy", None) => Err("missing field `sigma` (kind `noisy` needs it)".into()),
            (kind @ ("exact" | "none"), Some(_)) => Err(format!(
                "unknown field `sigma` for kind `{kind}` (only `noisy` has one)"
            )),
            (kind, _) => Err(format!(
                "unknown variant `{kind}`, expected one of `exact`, `noisy`, `none`"
            )),
        }
    }
}

/// Per-agent program distributions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Number of turns per agent (rounded, at least 1).
    pub turns: Distribution,
    /// Prompt tokens of the first turn.
    pub first_prompt_tokens: Distribution,
    /// New tokens (tool output, user message) appended at each later turn.
    pub new_tokens: Distribution,
    /// Tokens generated per turn (at least 1).
    pub generated_tokens: Distribution,
    /// Pause after each turn but the last, in seconds.
    pub pause_s: Distribution,
}

/// A whole workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub schema_version: u32,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Default agent count (overridden by `--agents`); ignored for explicit arrivals.
    pub agents: u32,
    /// The model window: an agent's program ends before its context would exceed it.
    pub max_context_tokens: u32,
    /// Required unless `replay` is given (the trace then gives arrival times).
    #[serde(default = "Arrival::missing")]
    pub arrival: Arrival,
    /// Required unless `replay` is given (the trace then gives every turn).
    #[serde(default = "AgentSpec::missing")]
    pub agent: AgentSpec,
    pub hint: HintSpec,
    /// Agent programs replayed from a trace file instead of drawn from `arrival` and `agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplaySpec>,
    /// Background (non-agent, single-turn) requests from an Azure-format CSV, mixed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<BackgroundSpec>,
    /// Shared prefixes (`[[prefix_groups]]`): each group's agents start their first prompt with
    /// the same tokens, whose KV the serving engine may hold once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix_groups: Vec<PrefixGroupSpec>,
}

/// A prefix shared by a fraction of the agents: a framework's system prompt and tool schemas.
/// An agent of the group starts its first prompt with these `tokens`, followed by its own
/// `first_prompt_tokens` (which do not include the prefix).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixGroupSpec {
    pub name: String,
    /// Length of the shared prefix, in 1..=max_context_tokens / 2.
    pub tokens: u32,
    /// Fraction of the agents in the group, in (0, 1]; the groups' shares sum to at most 1 and
    /// the remaining agents have no shared prefix. Which agents belong is drawn with the seed.
    /// Required for generated agents; absent in a `turns` replay, whose `prefix_group` column
    /// says which sessions belong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<f64>,
    /// Whether the serving engine may hold the prefix once for all the group's agents (the
    /// default). `false` keeps the tokens at the head of every group agent's first prompt but
    /// gives each agent its own copy, prefilled and held per agent: the same programs without
    /// sharing, the baseline of a with/without comparison.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub shared: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Trace formats a `[replay]` table may name.
pub const REPLAY_FORMATS: [&str; 4] = ["mooncake", "turns", "turns-csv", "turns-jsonl"];

/// A trace replayed as agent programs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaySpec {
    /// Trace format: `mooncake` (JSONL; multi-turn sessions by the prefix-hash rule), or `turns`
    /// (explicit per-session turn lists, CSV or JSONL by the file's extension; `turns-csv` and
    /// `turns-jsonl` name the syntax outright).
    pub format: String,
    /// Path to the trace, or the name of a sample shipped with the project.
    pub path: String,
    /// Every token count is multiplied by this (fits long traces to a model window).
    #[serde(default = "one")]
    pub token_scale: f64,
    /// Every arrival time and pause is multiplied by this (compresses or stretches time).
    #[serde(default = "one")]
    pub time_scale: f64,
    /// `turns` only: reach any agent count by replaying the sessions again, each further lap in
    /// a fresh seeded order.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cycle: bool,
}

impl ReplaySpec {
    /// Whether this replays explicit turn lists (any of the `turns` formats).
    pub fn is_turns(&self) -> bool {
        self.format.starts_with("turns")
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Background traffic mixed into a workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackgroundSpec {
    /// Path to an Azure-format CSV (TIMESTAMP, ContextTokens, GeneratedTokens), or a shipped sample name.
    pub path: String,
    /// Fraction of all requests (turns) that are background, in [0, 0.9].
    pub fraction: f64,
    #[serde(default = "one")]
    pub token_scale: f64,
}

fn one() -> f64 {
    1.0
}

impl Arrival {
    /// Placeholder of an absent `[arrival]` (allowed only with `replay`).
    pub fn missing() -> Arrival {
        Arrival::Explicit {
            times_s: Vec::new(),
        }
    }
}

impl AgentSpec {
    /// Placeholder of an absent `[agent]` (allowed only with `replay`).
    pub fn missing() -> AgentSpec {
        let nothing = Distribution::Constant { value: -1.0 };
        AgentSpec {
            turns: nothing.clone(),
            first_prompt_tokens: nothing.clone(),
            new_tokens: nothing.clone(),
            generated_tokens: nothing.clone(),
            pause_s: nothing,
        }
    }
}

/// Results are written under a folder of the workload's name (`<out>/<name>/`), so it must be
/// one plain folder name: no separator or `..` could send them elsewhere.
fn check_name(name: &str) -> Result<(), String> {
    let plain = name.len() <= 200
        && !name.starts_with('.')
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c == ':' || c.is_control());
    if plain {
        Ok(())
    } else {
        Err(format!(
            "must be a plain folder name (at most 200 characters, no '/', '\\', ':' or control characters, not starting with '.'), got {name:?}"
        ))
    }
}

/// Upper bounds that keep a spec from asking for absurd runs (each is a limit checked at load).
pub const AGENTS_MAX: u32 = 1_000_000;
pub const CONTEXT_TOKENS_MAX: u32 = 1 << 20;
pub const PREFIX_GROUPS_MAX: usize = 4096;

impl WorkloadSpec {
    /// Parses and validates TOML text that came from `path`.
    pub fn from_toml_str(path: &Path, text: &str) -> Result<Self, TraceError> {
        let spec: WorkloadSpec = crate::io::parse_toml(path, text)?;
        spec.validate(path)?;
        Ok(spec)
    }

    /// Reads and validates a spec file.
    pub fn read(path: &Path) -> Result<Self, TraceError> {
        let text = read_text(path)?;
        Self::from_toml_str(path, &text)
    }

    /// Range and consistency checks; the error names the field.
    pub fn validate(&self, path: &Path) -> Result<(), TraceError> {
        let fail = |field: &str, message: String| Err(TraceError::invalid(path, field, message));
        crate::check_schema_version(path, self.schema_version)?;
        if self.name.trim().is_empty() {
            return fail("name", "must not be empty".into());
        }
        check_name(&self.name).map_err(|message| TraceError::invalid(path, "name", message))?;
        if self.agents == 0 || self.agents > AGENTS_MAX {
            return fail(
                "agents",
                format!("must be in 1..={AGENTS_MAX}, got {}", self.agents),
            );
        }
        if self.max_context_tokens < 2 || self.max_context_tokens > CONTEXT_TOKENS_MAX {
            return fail(
                "max_context_tokens",
                format!(
                    "must be in 2..={CONTEXT_TOKENS_MAX}, got {}",
                    self.max_context_tokens
                ),
            );
        }
        self.validate_traces(path)?;
        if let HintSpec::Noisy { sigma } = self.hint {
            if !sigma.is_finite() || sigma < 0.0 {
                return fail(
                    "hint.sigma",
                    format!("must be a finite number >= 0, got {sigma}"),
                );
            }
        }
        self.validate_prefix_groups(path)?;
        if let Some(r) = &self.replay {
            if self.arrival == Arrival::missing() {
                return Ok(());
            }
            if !r.is_turns() {
                // A Mooncake trace's own timestamps are its arrivals; a table it ignored would
                // silently not mean what it says.
                return fail(
                    "arrival",
                    "not used by a mooncake replay (the trace's timestamps are the arrivals): remove it".into(),
                );
            }
            return self.validate_arrival(path);
        }
        if self.arrival == Arrival::missing() {
            return fail(
                "arrival",
                "missing (required unless [replay] is given)".into(),
            );
        }
        if self.agent == AgentSpec::missing() {
            return fail(
                "agent",
                "missing (required unless [replay] is given)".into(),
            );
        }
        self.validate_arrival(path)?;
        let a = &self.agent;
        for (name, dist) in [
            ("agent.turns", &a.turns),
            ("agent.first_prompt_tokens", &a.first_prompt_tokens),
            ("agent.new_tokens", &a.new_tokens),
            ("agent.generated_tokens", &a.generated_tokens),
            ("agent.pause_s", &a.pause_s),
        ] {
            dist.validate(name)
                .map_err(|(field, message)| TraceError::invalid(path, field, message))?;
        }
        Ok(())
    }

    /// The `[[prefix_groups]]` tables: plain unique names, lengths within half the window (the
    /// rest of a first prompt and its output must fit), shares in (0, 1] summing to at most 1.
    fn validate_prefix_groups(&self, path: &Path) -> Result<(), TraceError> {
        let fail = |field: String, message: String| Err(TraceError::invalid(path, &field, message));
        if self.prefix_groups.is_empty() {
            return Ok(());
        }
        if self.prefix_groups.len() > PREFIX_GROUPS_MAX {
            return fail(
                "prefix_groups".into(),
                format!(
                    "at most {PREFIX_GROUPS_MAX} groups, got {}",
                    self.prefix_groups.len()
                ),
            );
        }
        // A turns file names each session's group; a Mooncake trace has no such column.
        let from_file = match &self.replay {
            Some(r) if r.is_turns() => true,
            Some(_) => {
                return fail(
                    "prefix_groups".into(),
                    "not supported with a mooncake replay (a `turns` file's prefix_group column or generated agents use groups)".into(),
                )
            }
            None => false,
        };
        let mut total = 0.0;
        for (i, g) in self.prefix_groups.iter().enumerate() {
            let field = |name: &str| format!("prefix_groups[{i}].{name}");
            if g.name.trim().is_empty()
                || g.name.len() > 200
                || g.name.chars().any(char::is_control)
            {
                return fail(
                    field("name"),
                    format!("must be a non-empty plain name, got {:?}", g.name),
                );
            }
            if self.prefix_groups[..i].iter().any(|o| o.name == g.name) {
                return fail(field("name"), format!("{:?} names two groups", g.name));
            }
            let max = self.max_context_tokens / 2;
            if g.tokens == 0 || g.tokens > max {
                return fail(
                    field("tokens"),
                    format!(
                        "must be in 1..={max} (half of max_context_tokens), got {}",
                        g.tokens
                    ),
                );
            }
            let share = match (g.share, from_file) {
                (None, true) => continue,
                (Some(_), true) => {
                    return fail(
                        field("share"),
                        "not used by a turns replay (the file's prefix_group column assigns sessions): remove it".into(),
                    )
                }
                (None, false) => {
                    return fail(
                        field("share"),
                        "missing (the fraction of agents in the group, in (0, 1])".into(),
                    )
                }
                (Some(share), false) => share,
            };
            if !share.is_finite() || share <= 0.0 || share > 1.0 {
                return fail(field("share"), format!("must be in (0, 1], got {share}"));
            }
            total += share;
        }
        if total > 1.0 + 1e-9 {
            return fail(
                "prefix_groups".into(),
                format!("shares sum to {total}, more than 1"),
            );
        }
        Ok(())
    }

    /// The `[arrival]` table's ranges.
    fn validate_arrival(&self, path: &Path) -> Result<(), TraceError> {
        let fail = |field: &str, message: String| Err(TraceError::invalid(path, field, message));
        match &self.arrival {
            Arrival::Poisson { rate_per_s } => {
                if !rate_per_s.is_finite() || *rate_per_s <= 0.0 {
                    return fail(
                        "arrival.rate_per_s",
                        format!("must be a finite number > 0, got {rate_per_s}"),
                    );
                }
            }
            Arrival::Ramp { ramp_s } => {
                if !ramp_s.is_finite() || *ramp_s < 0.0 {
                    return fail(
                        "arrival.ramp_s",
                        format!("must be a finite number >= 0, got {ramp_s}"),
                    );
                }
            }
            Arrival::Explicit { times_s } => {
                if times_s.is_empty() || times_s.len() > AGENTS_MAX as usize {
                    return fail(
                        "arrival.times_s",
                        format!("must list 1..={AGENTS_MAX} times"),
                    );
                }
                for (i, t) in times_s.iter().enumerate() {
                    if !t.is_finite() || *t < 0.0 {
                        return fail(
                            &format!("arrival.times_s[{i}]"),
                            format!("must be a finite number >= 0, got {t}"),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The `[replay]` and `[background]` tables, when present.
    fn validate_traces(&self, path: &Path) -> Result<(), TraceError> {
        let fail = |field: &str, message: String| Err(TraceError::invalid(path, field, message));
        if let Some(r) = &self.replay {
            if !REPLAY_FORMATS.contains(&r.format.as_str()) {
                return fail(
                    "replay.format",
                    format!("must be one of {REPLAY_FORMATS:?}, got {:?}", r.format),
                );
            }
            if r.cycle && !r.is_turns() {
                return fail(
                    "replay.cycle",
                    "only a `turns` replay can cycle its sessions".into(),
                );
            }
            if r.path.trim().is_empty() {
                return fail("replay.path", "must not be empty".into());
            }
            for (name, v) in [
                ("replay.token_scale", r.token_scale),
                ("replay.time_scale", r.time_scale),
            ] {
                if !v.is_finite() || v <= 0.0 || v > 1e6 {
                    return fail(
                        name,
                        format!("must be a finite number in (0, 1e6], got {v}"),
                    );
                }
            }
        }
        if let Some(b) = &self.background {
            if b.path.trim().is_empty() {
                return fail("background.path", "must not be empty".into());
            }
            if !b.fraction.is_finite() || !(0.0..=0.9).contains(&b.fraction) {
                return fail(
                    "background.fraction",
                    format!("must be in [0, 0.9], got {}", b.fraction),
                );
            }
            if !b.token_scale.is_finite() || b.token_scale <= 0.0 || b.token_scale > 1e6 {
                return fail(
                    "background.token_scale",
                    format!("must be a finite number in (0, 1e6], got {}", b.token_scale),
                );
            }
        }
        Ok(())
    }

    /// The agent count a run uses: explicit arrivals fix it, otherwise the override or the default.
    pub fn agent_count(&self, override_agents: Option<u32>) -> u32 {
        match &self.arrival {
            // A replay without `[arrival]` holds the empty placeholder: it takes N sessions.
            Arrival::Explicit { times_s } if !times_s.is_empty() => times_s.len() as u32,
            _ => override_agents.unwrap_or(self.agents),
        }
    }

    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a validated spec always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
schema_version = 1
name = "t"
agents = 3
max_context_tokens = 4096
[arrival]
kind = "poisson"
rate_per_s = 0.2
[agent]
turns = { kind = "constant", value = 2 }
first_prompt_tokens = { kind = "lognormal", median = 1020.0, p90 = 2734.0 }
new_tokens = { kind = "mixture", components = [ { weight = 0.6, dist = { kind = "uniform", low = 1.0, high = 2.0 } }, { weight = 0.4, dist = { kind = "exponential", mean = 3.0 } } ] }
generated_tokens = { kind = "constant", value = 128 }
pause_s = { kind = "uniform", low = 10.0, high = 20.0 }
[hint]
kind = "noisy"
sigma = 0.5
"#;

    #[test]
    fn good_spec_parses_and_round_trips() {
        let spec = WorkloadSpec::from_toml_str(Path::new("good.toml"), GOOD).unwrap();
        assert_eq!(spec.agents, 3);
        let again = WorkloadSpec::from_toml_str(Path::new("x"), &spec.to_toml_string()).unwrap();
        assert_eq!(spec, again);
    }

    #[test]
    fn prefix_groups_are_checked() {
        let path = Path::new("w.toml");
        let group = |name: &str, tokens: u32, share: f64| {
            format!("{GOOD}\n[[prefix_groups]]\nname = \"{name}\"\ntokens = {tokens}\nshare = {share}\n")
        };
        let ok = WorkloadSpec::from_toml_str(path, &group("sys", 1024, 0.9)).unwrap();
        assert_eq!(ok.prefix_groups[0].tokens, 1024);
        assert!(ok.prefix_groups[0].shared);
        let round = WorkloadSpec::from_toml_str(path, &ok.to_toml_string()).unwrap();
        assert_eq!(round, ok);
        let own = format!("{}shared = false\n", group("sys", 1024, 0.9));
        let own = WorkloadSpec::from_toml_str(path, &own).unwrap();
        assert!(!own.prefix_groups[0].shared);
        assert_eq!(
            WorkloadSpec::from_toml_str(path, &own.to_toml_string()).unwrap(),
            own
        );
        for (text, field) in [
            (group("sys", 0, 0.5), "prefix_groups[0].tokens"),
            (group("sys", 4000, 0.5), "prefix_groups[0].tokens"),
            (group("sys", 10, 1.5), "prefix_groups[0].share"),
            (group("", 10, 0.5), "prefix_groups[0].name"),
            (
                group("sys", 10, 0.5).replace("share = 0.5\n", ""),
                "prefix_groups[0].share",
            ),
            (
                format!(
                    "{}{}",
                    group("a", 10, 0.6),
                    &group("b", 10, 0.6)[GOOD.len()..]
                ),
                "prefix_groups",
            ),
        ] {
            let e = WorkloadSpec::from_toml_str(path, &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains("w.toml"), "{e}");
        }
    }

    #[test]
    fn prefix_groups_of_a_turns_replay_take_no_share() {
        let path = Path::new("r.toml");
        let spec = |format: &str, share: &str| {
            format!(
                "schema_version = 1\nname = \"r\"\nagents = 2\nmax_context_tokens = 4096\n\
                 [replay]\nformat = \"{format}\"\npath = \"t.csv\"\n[hint]\nkind = \"none\"\n\
                 [[prefix_groups]]\nname = \"sys\"\ntokens = 100\n{share}"
            )
        };
        let ok = WorkloadSpec::from_toml_str(path, &spec("turns", "")).unwrap();
        assert_eq!(ok.prefix_groups[0].share, None);
        assert_eq!(
            WorkloadSpec::from_toml_str(path, &ok.to_toml_string()).unwrap(),
            ok
        );
        for (text, field) in [
            (spec("turns", "share = 0.5\n"), "prefix_groups[0].share"),
            (spec("mooncake", ""), "prefix_groups"),
        ] {
            let e = WorkloadSpec::from_toml_str(path, &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains("r.toml"), "{e}");
        }
    }

    #[test]
    fn errors_name_file_and_field() {
        let bad = GOOD.replace("low = 10.0", "low = -1.0");
        let err = WorkloadSpec::from_toml_str(Path::new("w.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("w.toml") && err.contains("agent.pause_s.low"),
            "{err}"
        );
        let bad = GOOD.replace("rate_per_s = 0.2", "rate_per_s = nan");
        let err = WorkloadSpec::from_toml_str(Path::new("w.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("arrival.rate_per_s"), "{err}");
        let bad = GOOD.replace("agents = 3", "agents = 3\nsurprise = 1");
        let err = WorkloadSpec::from_toml_str(Path::new("w.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 5") && err.contains("surprise"), "{err}");
        for name in ["../up", "a/b", ".hidden", "c:d"] {
            let bad = GOOD.replace("name = \"t\"", &format!("name = {name:?}"));
            let err = WorkloadSpec::from_toml_str(Path::new("w.toml"), &bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("w.toml") && err.contains("`name`"), "{err}");
        }
        let bad = GOOD.replace("agents = 3", "agents = \"three\"");
        let err = WorkloadSpec::from_toml_str(Path::new("w.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("w.toml") && err.contains("line 4"), "{err}");
    }

    #[test]
    fn lognormal_p90_gives_the_right_sigma() {
        let s = Distribution::lognormal_sigma(1020.0, None, Some(2734.0));
        assert!((s - (2734.0f64 / 1020.0).ln() / Z_P90).abs() < 1e-12);
        assert!((s - 0.7694).abs() < 1e-3, "{s}");
    }
}
