//! Mutated model files never crash the loaders nor make them allocate beyond the file.
//!
//! Inputs: the checked-in tiny GGUF (weights, tokenizer and chat template) and the tiny HF model
//! (`tiny/config.json` + `model.safetensors`), with random byte flips, u32/u64 overwrites (biased
//! towards the fields that hold lengths, counts and dimensions), numbers in the JSON replaced by
//! huge ones, and truncations. For every case the loaders must return Ok or a typed error that
//! names the file, must not panic, and must not allocate more than `ALLOCATION_FACTOR` times the
//! file's size plus `ALLOCATION_SLACK` at peak: this binary's global allocator counts bytes, so
//! an allocation sized by an unchecked count fails the case instead of aborting the machine.
//! (An abort would still end this test binary, which fails the test too.)
//!
//! Cases per property: 96 by default (a few seconds); `DJINN_PROPTEST_CASES` raises it for a soak.

mod cpu_common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use cpu_common::{data_dir, temp_dir};
use engine::tokenizer::{ChatMessage, Tokenizer};
use engine::weights::{read_gguf_header, WeightSet};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

/// Peak bytes a load may allocate per byte of its input. Why this much: a GGUF's metadata values
/// are 32-byte enums (a u8 array grows 32x), and a Q4 tensor dequantises to about 7x its bytes
/// in f32, transiently held two or three times over while candle converts it.
const ALLOCATION_FACTOR: usize = 48;
/// Fixed overhead: buffers, error messages, the template engine.
const ALLOCATION_SLACK: usize = 2 << 20;

const DEFAULT_CASES: u32 = 96;

struct CountingAllocator;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The properties run one at a time so that the peak belongs to one load.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Largest peak seen in a property as a fraction of its bound, in thousandths (printed).
static WORST_USE: AtomicUsize = AtomicUsize::new(0);

/// Runs `load` and returns its result and the peak bytes allocated above what was live before.
fn measured<T>(load: impl FnOnce() -> T) -> (std::thread::Result<T>, usize) {
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = catch_unwind(AssertUnwindSafe(load));
    (result, PEAK.load(Ordering::Relaxed).saturating_sub(before))
}

fn cases() -> u32 {
    match std::env::var("DJINN_PROPTEST_CASES") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("DJINN_PROPTEST_CASES={text:?} is not a number")),
        Err(_) => DEFAULT_CASES,
    }
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        rng_seed: RngSeed::Fixed(0x6775_6666),
        failure_persistence: None,
        ..Config::default()
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: usize,
        mask: u8,
    },
    U32 {
        at: usize,
        value: u32,
    },
    U64 {
        at: usize,
        value: u64,
    },
    /// Replace the `nth` run of ASCII digits in the region by `value` (JSON headers).
    Number {
        nth: usize,
        value: u64,
    },
    Truncate {
        len: usize,
    },
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u32::MAX as u64),
        Just(1 << 32),
        Just(1 << 40),
        Just(1 << 62),
        Just(1 << 63),
        Just(u64::MAX),
        Just(1_000_000_000),
        0u64..70_000,
        any::<u64>(),
    ]
}

/// Mutations inside `region` bytes (the header), at `fields` (offsets of lengths and counts) more
/// often than elsewhere, and truncations anywhere in `file_len` bytes.
fn mutations(
    region: usize,
    fields: Vec<usize>,
    file_len: usize,
) -> impl Strategy<Value = Vec<Mutation>> {
    let at = prop_oneof![0..region, proptest::sample::select(fields)];
    let one = prop_oneof![
        (at.clone(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        (at.clone(), interesting_u64()).prop_map(|(at, v)| Mutation::U32 {
            at,
            value: v as u32
        }),
        (at, interesting_u64()).prop_map(|(at, value)| Mutation::U64 { at, value }),
        (0usize..64, interesting_u64()).prop_map(|(nth, value)| Mutation::Number { nth, value }),
        (0..file_len).prop_map(|len| Mutation::Truncate { len }),
    ];
    proptest::collection::vec(one, 1..4)
}

/// Applies the mutations; `length_prefix` says the region starts with its own u64 length
/// (safetensors), which a `Number` edit keeps right so the JSON is still read.
fn mutate(original: &[u8], region: usize, mutations: &[Mutation], length_prefix: bool) -> Vec<u8> {
    let mut bytes = original.to_vec();
    let mut region = region;
    for mutation in mutations {
        match *mutation {
            Mutation::Flip { at, mask } => {
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= mask;
                }
            }
            Mutation::U32 { at, value } => write_at(&mut bytes, at, &value.to_le_bytes()),
            Mutation::U64 { at, value } => write_at(&mut bytes, at, &value.to_le_bytes()),
            Mutation::Number { nth, value } => {
                let end = region.min(bytes.len());
                let Some((start, stop)) = digit_runs(&bytes[..end]).into_iter().nth(nth) else {
                    continue;
                };
                let digits = value.to_string().into_bytes();
                let delta = digits.len() as i64 - (stop - start) as i64;
                bytes.splice(start..stop, digits);
                region = region.saturating_add_signed(delta as isize);
                if length_prefix && bytes.len() >= 8 {
                    let old = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                    let new = old.wrapping_add_signed(delta);
                    bytes[..8].copy_from_slice(&new.to_le_bytes());
                }
            }
            Mutation::Truncate { len } => bytes.truncate(len),
        }
    }
    bytes
}

fn write_at(bytes: &mut [u8], at: usize, value: &[u8]) {
    let end = (at + value.len()).min(bytes.len());
    if at < end {
        bytes[at..end].copy_from_slice(&value[..end - at]);
    }
}

fn digit_runs(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at].is_ascii_digit() {
            let start = at;
            while at < bytes.len() && bytes[at].is_ascii_digit() {
                at += 1;
            }
            runs.push((start, at));
        } else {
            at += 1;
        }
    }
    runs
}

/// Offsets in `region` holding a plausible length, count or dimension (1..=70000) as u32 or u64:
/// where an overwrite does the most damage.
fn length_fields(bytes: &[u8], region: usize) -> Vec<usize> {
    let plausible = |v: u64| (1..=70_000).contains(&v);
    let mut fields: Vec<usize> = (0..region.saturating_sub(4))
        .filter(|&at| plausible(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as u64))
        .collect();
    fields.retain(|&at| at % 2 == 0 || at < 32);
    fields.push(0);
    fields
}

/// The failure of a case, if any: a panic, an error that does not name the file, or a peak
/// allocation beyond the bound.
fn judge(
    what: &str,
    path: &Path,
    file_len: usize,
    result: std::thread::Result<Result<(), String>>,
    peak: usize,
) -> Result<(), TestCaseError> {
    let bound = ALLOCATION_FACTOR * file_len + ALLOCATION_SLACK;
    WORST_USE.fetch_max(peak * 1000 / bound, Ordering::Relaxed);
    if peak > bound {
        return Err(TestCaseError::fail(format!(
            "{what}: peak allocation {peak} bytes exceeds {bound} for a {file_len}-byte file"
        )));
    }
    match result {
        Err(_) => Err(TestCaseError::fail(format!("{what} panicked"))),
        Ok(Err(message)) if !message.contains(&path.display().to_string()) => Err(
            TestCaseError::fail(format!("{what}: error does not name the file: {message}")),
        ),
        Ok(_) => Ok(()),
    }
}

/// Prints how the cases went and checks that some mutations were refused (else they do not bite).
fn report(what: &str, outcomes: [AtomicUsize; 2]) {
    let [refused, loaded] = outcomes.map(AtomicUsize::into_inner);
    eprintln!(
        "mutated {what}: {loaded} loaded, {refused} refused, worst peak {:.1}% of the bound",
        WORST_USE.swap(0, Ordering::Relaxed) as f64 / 10.0
    );
    assert!(
        refused > 0,
        "no {what} mutation was refused: the mutations do not bite"
    );
}

/// Everything read from one GGUF: weights, tokenizer, its chat template and an encoding.
fn load_gguf_everything(path: &Path) -> Result<(), String> {
    let weights = WeightSet::from_gguf(path).map(|_| ());
    let tokenizer = Tokenizer::from_gguf(path).map_err(|e| e.to_string())?;
    let prompt = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", "Hello world 42")], true)
        .map_err(|e| e.to_string())?;
    tokenizer.encode(&prompt).map_err(|e| e.to_string())?;
    weights.map_err(|e| e.to_string())
}

#[test]
fn mutated_gguf_headers_load_or_fail_cleanly_within_the_file_size() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let original_path = data_dir().join("tiny-chat-q8-q4-f16.gguf");
    let original = std::fs::read(&original_path).unwrap();
    let region = read_gguf_header(&original_path)
        .unwrap()
        .content
        .tensor_data_offset as usize;
    let (result, peak) = measured(|| load_gguf_everything(&original_path));
    assert_eq!(result.unwrap(), Ok(()));
    eprintln!(
        "pristine GGUF: {} bytes, header {region} bytes, peak allocation {peak} bytes ({:.1}x)",
        original.len(),
        peak as f64 / original.len() as f64
    );
    let path = temp_dir("fuzz_gguf").join("mutated.gguf");
    let fields = length_fields(&original, region);
    let strategy = mutations(region, fields, original.len());
    let outcomes = [AtomicUsize::new(0), AtomicUsize::new(0)];
    runner()
        .run(&strategy, |mutations| {
            let bytes = mutate(&original, region, &mutations, false);
            std::fs::write(&path, &bytes).unwrap();
            let (result, peak) = measured(|| load_gguf_everything(&path));
            if let Ok(outcome) = &result {
                outcomes[outcome.is_ok() as usize].fetch_add(1, Ordering::Relaxed);
            }
            judge("GGUF", &path, bytes.len(), result, peak)
        })
        .unwrap();
    report("GGUF", outcomes);
}

#[test]
fn mutated_safetensors_and_configs_load_or_fail_cleanly_within_the_file_size() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tiny = data_dir().join("tiny");
    let weights = std::fs::read(tiny.join("model.safetensors")).unwrap();
    let config = std::fs::read(tiny.join("config.json")).unwrap();
    let region = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let dir = temp_dir("fuzz_safetensors");
    let strategy = (
        any::<bool>(),
        mutations(region, length_fields(&weights, 8), weights.len()),
    );
    let outcomes = [AtomicUsize::new(0), AtomicUsize::new(0)];
    runner()
        .run(&strategy, |(in_config, mutations)| {
            let (model, config) = if in_config {
                (
                    weights.clone(),
                    mutate(&config, config.len(), &mutations, false),
                )
            } else {
                (mutate(&weights, region, &mutations, true), config.clone())
            };
            std::fs::write(dir.join("model.safetensors"), &model).unwrap();
            std::fs::write(dir.join("config.json"), &config).unwrap();
            let (result, peak) = measured(|| {
                WeightSet::from_hf_dir(&dir)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            if let Ok(outcome) = &result {
                outcomes[outcome.is_ok() as usize].fetch_add(1, Ordering::Relaxed);
            }
            judge(
                "safetensors",
                &dir,
                model.len() + config.len(),
                result,
                peak,
            )
        })
        .unwrap();
    report("safetensors/config", outcomes);
}
