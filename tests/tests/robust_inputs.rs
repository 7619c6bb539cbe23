//! Robust inputs: the workload spec (TOML), record (CSV) and GPU profile (JSON) readers, fed
//! arbitrary bytes and mutated valid files, never panic; every error names the file and the line
//! or field. Inputs that do parse must also be usable without a panic (a spec generates agent
//! programs, a profile runs a tiny simulation).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use djinn_tests::digest::temp_dir;
use djinn_tests::env;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use sim::experiment::{shipped_workload, SimConfig};
use sim::PolicyKind;
use traces::{GpuProfile, StepRecord, SwapRecord, TraceError, TurnRecord, WorkloadSpec};

const CASES: u32 = 256;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write input file");
    path
}

/// An error must name the file and say where: a line, a field, a byte offset or the document.
fn check_error(err: &TraceError, file_name: &str) -> Result<(), String> {
    let text = err.to_string();
    if !text.contains(file_name) {
        return Err(format!("error does not name the file {file_name}: {text}"));
    }
    let located = match err {
        TraceError::Parse { location, .. } => {
            location.starts_with("line ") || location == "document"
        }
        TraceError::Invalid { field, .. } => !field.is_empty(),
        TraceError::NotUtf8 { .. } => text.contains("byte "),
        TraceError::Io { .. } => false,
    };
    if !located {
        return Err(format!("error does not say where in {file_name}: {text}"));
    }
    Ok(())
}

/// Runs `f`, turning a panic into a failure message.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{what} panicked: {msg}")
    })
}

/// What a reader of one format does with a file.
#[derive(Clone, Copy, Debug)]
enum Format {
    Spec,
    Profile,
    Turns,
    Steps,
    Swaps,
}

impl Format {
    fn file_name(self) -> &'static str {
        match self {
            Format::Spec => "workload.toml",
            Format::Profile => "profile.json",
            Format::Turns => "turns.csv",
            Format::Steps => "steps.csv",
            Format::Swaps => "swaps.csv",
        }
    }

    /// A valid file of this format.
    fn valid(self) -> Vec<u8> {
        match self {
            Format::Spec => shipped_workload("agents-capacity")
                .expect("shipped")
                .as_bytes()
                .to_vec(),
            Format::Profile => calibration::SHIPPED_PROFILES[0].2.as_bytes().to_vec(),
            Format::Turns | Format::Steps | Format::Swaps => {
                let (turns, steps, swaps) = tiny_run_records();
                match self {
                    Format::Turns => traces::io::csv_bytes(&turns),
                    Format::Steps => traces::io::csv_bytes(&steps),
                    _ => traces::io::csv_bytes(&swaps),
                }
                .expect("records serialize")
            }
        }
    }

    /// Reads `path`; an error must name the file and where; a success must be usable.
    fn check(self, path: &Path) -> Result<(), String> {
        let name = self.file_name();
        match self {
            Format::Spec => match no_panic("reading the spec", || WorkloadSpec::read(path))? {
                Err(e) => check_error(&e, name),
                Ok(spec) => {
                    let agents = spec.agent_count(Some(3)).min(3);
                    no_panic("generating from the spec", || {
                        sim::workload::generate(&spec, agents, 1)
                    })
                    .map(|_| ())
                }
            },
            Format::Profile => match no_panic("reading the profile", || GpuProfile::read(path))? {
                Err(e) => check_error(&e, name),
                Ok(profile) => no_panic("simulating with the profile", || tiny_simulation(profile)),
            },
            Format::Turns => {
                match no_panic("reading turns", || traces::read_csv::<TurnRecord>(path))? {
                    Err(e) => check_error(&e, name),
                    Ok(_) => Ok(()),
                }
            }
            Format::Steps => {
                match no_panic("reading steps", || traces::read_csv::<StepRecord>(path))? {
                    Err(e) => check_error(&e, name),
                    Ok(_) => Ok(()),
                }
            }
            Format::Swaps => {
                match no_panic("reading swaps", || traces::read_csv::<SwapRecord>(path))? {
                    Err(e) => check_error(&e, name),
                    Ok(_) => Ok(()),
                }
            }
        }
    }
}

const FORMATS: [Format; 5] = [
    Format::Spec,
    Format::Profile,
    Format::Turns,
    Format::Steps,
    Format::Swaps,
];

/// Records of a tiny run that swaps (so every CSV has rows).
fn tiny_run_records() -> (Vec<TurnRecord>, Vec<StepRecord>, Vec<SwapRecord>) {
    let spec = WorkloadSpec::from_toml_str(
        Path::new("seed-cliff"),
        shipped_workload("seed-cliff").expect("shipped"),
    )
    .expect("parses");
    let mut config = SimConfig::new(
        PolicyKind::Swap,
        calibration::load_profile(calibration::DEFAULT_PROFILE).expect("profile"),
    );
    config.gpu_memory_utilization = 0.25;
    let (_, out) = sim::experiment::simulate(&spec, Some(4), &config).expect("tiny run");
    assert!(!out.swaps.is_empty(), "the tiny run should swap");
    (out.turns, out.steps, out.swaps)
}

/// A two-agent simulation with `profile`: it may fail with an error, never panic.
fn tiny_simulation(profile: GpuProfile) {
    let spec = WorkloadSpec::from_toml_str(
        Path::new("seed-exp1"),
        shipped_workload("seed-exp1").expect("shipped"),
    )
    .expect("parses");
    let mut config = SimConfig::new(PolicyKind::Swap, profile);
    config.limits.max_steps = 100_000;
    if config.gpu_blocks() == 0 {
        return; // The CLI refuses this configuration before simulating.
    }
    let _ = sim::experiment::simulate(&spec, Some(2), &config);
}

/// Edits that turn a valid file into a suspicious one.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    DeleteRange(usize, usize),
    Insert(usize, Vec<u8>),
    /// Replace the n-th number in the text with a token.
    ReplaceNumber(usize, &'static str),
    DuplicateLine(usize),
    /// Add a line with an unknown key / column.
    UnknownField(usize),
}

const TOKENS: [&str; 20] = [
    "-1",
    "0",
    "-0.0",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e999",
    "1e300",
    "1e-320",
    "18446744073709551616",
    "4294967296",
    "99999999999999999999999",
    "\"text\"",
    "true",
    "[]",
    "{}",
    "",
    "0.5",
    "-9223372036854775808",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 0..64usize).prop_map(|(a, n)| Mutation::DeleteRange(a, n)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(a, b)| Mutation::Insert(a, b)),
        (0..64usize, prop::sample::select(&TOKENS[..]))
            .prop_map(|(n, t)| Mutation::ReplaceNumber(n, t)),
        (0..64usize, prop::sample::select(&TOKENS[..]))
            .prop_map(|(n, t)| Mutation::ReplaceNumber(n, t)),
        any::<usize>().prop_map(Mutation::DuplicateLine),
        any::<usize>().prop_map(Mutation::UnknownField),
    ]
}

fn apply(format: Format, mut bytes: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let len = bytes.len().max(1);
    match m {
        Mutation::Truncate(at) => bytes.truncate(at % len),
        Mutation::DeleteRange(at, n) => {
            let start = at % len;
            let end = (start + n).min(bytes.len());
            bytes.drain(start.min(end)..end);
        }
        Mutation::Insert(at, b) => {
            let at = at % len;
            bytes.splice(at.min(bytes.len())..at.min(bytes.len()), b.iter().copied());
        }
        Mutation::ReplaceNumber(n, token) => {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let numbers: Vec<(usize, usize)> = number_spans(&text);
            if !numbers.is_empty() {
                let (s, e) = numbers[n % numbers.len()];
                return format!("{}{}{}", &text[..s], token, &text[e..]).into_bytes();
            }
        }
        Mutation::DuplicateLine(n) => {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let i = n % lines.len();
                lines.insert(i, lines[i]);
            }
            return (lines.join("\n") + "\n").into_bytes();
        }
        Mutation::UnknownField(n) => {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            return match format {
                Format::Spec => format!("surprise_field = 1\n{text}"),
                Format::Profile => text.replacen('{', "{\"surprise_field\": 1, ", 1 + n % 2),
                _ => {
                    // An extra column in the header and in every row.
                    text.lines()
                        .enumerate()
                        .map(|(i, l)| {
                            if i == 0 {
                                format!("{l},surprise_field\n")
                            } else {
                                format!("{l},1\n")
                            }
                        })
                        .collect()
                }
            }
            .into_bytes();
        }
    }
    bytes
}

/// Byte spans of the numbers in a text (digits with an optional sign, point and exponent).
fn number_spans(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit()
            && (i == 0
                || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'-'))
        {
            let start = i;
            while i < b.len()
                && (b[i].is_ascii_digit()
                    || b[i] == b'.'
                    || b[i] == b'e'
                    || b[i] == b'E'
                    || b[i] == b'+'
                    || b[i] == b'_')
            {
                i += 1;
            }
            spans.push((start, i));
        } else {
            i += 1;
        }
    }
    spans
}

fn run(name: &str, strategy: impl Strategy<Value = (usize, Vec<u8>)>) {
    let dir = temp_dir(name);
    let mut runner = TestRunner::new(env::proptest_config(CASES));
    let result = runner.run(&strategy, |(format_index, bytes)| {
        let format = FORMATS[format_index % FORMATS.len()];
        let path = write(&dir, format.file_name(), &bytes);
        format.check(&path).map_err(|e| {
            TestCaseError::fail(format!(
                "{format:?}: {e}\n  input: {:?}",
                String::from_utf8_lossy(&bytes)
            ))
        })
    });
    std::fs::remove_dir_all(&dir).ok();
    if let Err(e) = result {
        panic!("{name} (proptest seed {}): {e}", env::proptest_seed());
    }
}

#[test]
fn arbitrary_bytes_never_panic_and_errors_name_file_and_place() {
    run(
        "arbitrary",
        (0..FORMATS.len(), prop::collection::vec(any::<u8>(), 0..512)),
    );
}

#[test]
fn mutated_valid_files_never_panic_and_errors_name_file_and_place() {
    let valid: Vec<Vec<u8>> = FORMATS.iter().map(|f| f.valid()).collect();
    let strategy =
        (0..FORMATS.len(), prop::collection::vec(mutation(), 1..4)).prop_map(move |(i, ms)| {
            let bytes = ms
                .iter()
                .fold(valid[i].clone(), |b, m| apply(FORMATS[i], b, m));
            (i, bytes)
        });
    run("mutated", strategy);
}

/// The named cases of the issue, one by one, with the error each must give.
#[test]
fn named_bad_inputs_give_errors_naming_file_and_place() {
    let dir = temp_dir("named");
    let spec = String::from_utf8(Format::Spec.valid()).expect("utf8");
    let profile = String::from_utf8(Format::Profile.valid()).expect("utf8");
    let turns = String::from_utf8(Format::Turns.valid()).expect("utf8");
    let mut cases: Vec<(Format, Vec<u8>, &str)> = vec![
        (Format::Spec, b"".to_vec(), "missing field"),
        (Format::Profile, b"".to_vec(), "line 1"),
        (Format::Turns, b"".to_vec(), "line 1"),
        (
            Format::Spec,
            spec.replace("agents = ", "agents = \"many\" #")
                .into_bytes(),
            "line ",
        ),
        (
            Format::Spec,
            spec.replace("ramp_s = ", "ramp_s = -").into_bytes(),
            "arrival.ramp_s",
        ),
        (
            Format::Spec,
            spec.replace("max_context_tokens = 4096", "max_context_tokens = 0")
                .into_bytes(),
            "max_context_tokens",
        ),
        (
            Format::Spec,
            spec.replace("ramp_s = 10.0", "ramp_s = nan").into_bytes(),
            "arrival.ramp_s",
        ),
        (
            Format::Spec,
            spec.replace("ramp_s = 10.0", "ramp_s = inf").into_bytes(),
            "arrival.ramp_s",
        ),
        (
            Format::Spec,
            spec.replace(
                "max_context_tokens = 4096",
                "max_context_tokens = 99999999999999999999",
            )
            .into_bytes(),
            "line ",
        ),
        (
            Format::Spec,
            format!("{spec}\nsurprise = 1\n").into_bytes(),
            "surprise",
        ),
        (
            Format::Spec,
            [spec.as_bytes(), b"\n# \xff\xfe\n"].concat(),
            "byte ",
        ),
        (
            Format::Profile,
            profile
                .replace(
                    "\"kv_bytes_per_token\": 524288",
                    "\"kv_bytes_per_token\": -1",
                )
                .into_bytes(),
            "line ",
        ),
        (
            Format::Profile,
            profile
                .replace(
                    "\"kv_bytes_per_token\": 524288",
                    "\"kv_bytes_per_token\": 0",
                )
                .into_bytes(),
            "kv_bytes_per_token",
        ),
        (
            Format::Profile,
            profile
                .replace("\"latency_ns\": 10000", "\"latency_ns\": 1e999")
                .into_bytes(),
            "line ",
        ),
        (
            Format::Profile,
            profile
                .replace(
                    "\"schema_version\": 1,",
                    "\"schema_version\": 1, \"surprise\": 2,",
                )
                .into_bytes(),
            "surprise",
        ),
        (
            Format::Turns,
            turns
                .lines()
                .take(2)
                .map(|l| l.to_string() + "\n")
                .collect::<String>()
                .replacen(',', ",x", 1)
                .into_bytes(),
            "line 2",
        ),
        (
            Format::Turns,
            format!("{}1,2,3\n", turns).into_bytes(),
            "line ",
        ),
        (
            Format::Turns,
            turns.replacen('\n', "\n-5", 1).into_bytes(),
            "line 2",
        ),
        (
            Format::Turns,
            [turns.as_bytes(), b"\xff\n"].concat(),
            "byte ",
        ),
    ];
    // Unknown or misplaced fields inside tagged tables (hint, arrival, distributions).
    let hint = |with: &str| spec.replace("kind = \"exact\"", with).into_bytes();
    cases.push((
        Format::Spec,
        hint("kind = \"none\"\nsurprise = 1"),
        "surprise",
    ));
    cases.push((Format::Spec, hint("kind = \"exact\"\nsigma = 0.5"), "sigma"));
    cases.push((Format::Spec, hint("kind = \"noisy\""), "sigma"));
    cases.push((Format::Spec, hint("kind = \"psychic\""), "psychic"));
    cases.push((
        Format::Spec,
        spec.replace("ramp_s = 10.0", "ramp_s = 10.0\nsurprise = 1")
            .into_bytes(),
        "surprise",
    ));
    cases.push((
        Format::Spec,
        spec.replace(
            "low = 0.01, high = 0.1 }",
            "low = 0.01, high = 0.1, surprise = 1 }",
        )
        .into_bytes(),
        "surprise",
    ));
    let mut failures = Vec::new();
    for (i, (format, bytes, phrase)) in cases.iter().enumerate() {
        let path = write(&dir, format.file_name(), bytes);
        let outcome = match format {
            Format::Spec => WorkloadSpec::read(&path).map(|_| ()),
            Format::Profile => GpuProfile::read(&path).map(|_| ()),
            Format::Turns => traces::read_csv::<TurnRecord>(&path).map(|_| ()),
            _ => unreachable!(),
        };
        match outcome {
            Ok(()) => failures.push(format!(
                "case {i} ({format:?}, expecting `{phrase}`): accepted"
            )),
            Err(e) => {
                let text = e.to_string();
                if let Err(why) = check_error(&e, format.file_name()) {
                    failures.push(format!("case {i}: {why}"));
                } else if !text.contains(phrase) {
                    failures.push(format!(
                        "case {i} ({format:?}): expected `{phrase}` in: {text}"
                    ));
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A run without swaps writes a `swaps.csv` that still has its header, and every CSV of a run
/// directory reads back (an empty file, which the reader rejects, was written before).
#[test]
fn run_directory_tables_read_back_even_when_empty() {
    let spec = WorkloadSpec::from_toml_str(
        Path::new("seed-exp1"),
        shipped_workload("seed-exp1").expect("shipped"),
    )
    .expect("parses");
    let config = SimConfig::new(
        PolicyKind::Pin,
        calibration::load_profile(calibration::DEFAULT_PROFILE).expect("profile"),
    );
    let (_, out) = sim::experiment::simulate(&spec, Some(2), &config).expect("runs");
    assert!(out.swaps.is_empty(), "pin never swaps");
    let dir = temp_dir("rundir-readback").join("run");
    djinn_tests::digest::write_run(&dir, &spec, 2, &config, &out);
    assert_eq!(
        traces::read_csv::<TurnRecord>(&dir.join("turns.csv")).expect("turns"),
        out.turns
    );
    assert_eq!(
        traces::read_csv::<StepRecord>(&dir.join("steps.csv")).expect("steps"),
        out.steps
    );
    let swaps = traces::read_csv::<SwapRecord>(&dir.join("swaps.csv"))
        .expect("an empty swaps table reads back");
    assert!(swaps.is_empty());
    let text = std::fs::read_to_string(dir.join("swaps.csv")).expect("swaps.csv");
    assert!(
        text.starts_with("swap_id,agent_id,direction,"),
        "header missing: {text:?}"
    );
}
