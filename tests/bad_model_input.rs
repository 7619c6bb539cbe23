//! Bad model files and absurd pool sizes on the command line: each exits 2 with a message that
//! names the file (or flag) and says what is wrong, in bounded memory (the command runs under a
//! virtual-memory limit, so an allocation sized by unchecked input fails the test instead of
//! swapping the machine). Also `engine generate --chat` with the template stored in the GGUF.
//!
//! The bad GGUFs are the checked-in tiny GGUF with one field overwritten, found by searching the
//! header for the key or tensor name that precedes it.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{djinn, fails_with, temp};

/// Virtual memory the command may map (KiB): far above what a tiny model needs, far below
/// what any of the bad inputs used to ask for.
const MEMORY_LIMIT_KIB: u64 = 8 << 20;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("engine/tests/data/tiny-chat-q8-q4-f16.gguf")
}

fn workload() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/engine-run-tiny.toml")
        .display()
        .to_string()
}

/// Runs `djinn args` under the memory limit.
fn run_limited(args: &[&str]) -> Output {
    let djinn = djinn();
    let program = djinn.get_program().to_owned();
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {MEMORY_LIMIT_KIB}; exec \"$0\" \"$@\""))
        .arg(program)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// Asserts exit code 2 and every needle in the error output.
fn fails_with_all(args: &[&str], needles: &[&str]) {
    let out = run_limited(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{args:?}: expected `{needle}` in: {stderr}"
        );
    }
}

/// Runs `djinn args` under the memory limit, asserts success and returns stdout.
fn succeeds(args: &[&str]) -> String {
    let out = run_limited(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Offset just past the first occurrence of `name` in the file's header.
fn after(bytes: &[u8], name: &str) -> usize {
    bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .unwrap_or_else(|| panic!("`{name}` not in the fixture"))
        + name.len()
}

/// The fixture with `value` written at `at`, saved as `dir/name`.
fn patched(dir: &Path, name: &str, at: usize, value: &[u8]) -> String {
    let mut bytes = std::fs::read(fixture()).unwrap();
    bytes[at..at + value.len()].copy_from_slice(value);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

fn generate(gguf: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "engine",
        "generate",
        "--gguf",
        gguf,
        "--prompt",
        "Hello world",
        "--steps",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn absurd_gguf_counts_lengths_and_dims_exit_2_naming_the_file_and_field() {
    let dir = temp("bad-model", "gguf");
    let bytes = std::fs::read(fixture()).unwrap();
    let huge = (1u64 << 62).to_le_bytes();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            patched(&dir, "tensor-count.gguf", 8, &huge),
            vec!["tensor-count.gguf", "the tensor count is 4611686018427387904 (2^62)", "cannot fit"],
        ),
        (
            patched(&dir, "metadata-count.gguf", 16, &huge),
            vec!["metadata-count.gguf", "the metadata count is 4611686018427387904 (2^62)"],
        ),
        (
            // The u64 length in front of the first key.
            patched(&dir, "key-length.gguf", after(&bytes, "general.architecture") - 28, &huge),
            vec!["key-length.gguf", "the string length is 4611686018427387904 (2^62) bytes, more than"],
        ),
        (
            // Key, value type (array), element type (string), then the array length.
            patched(&dir, "array-length.gguf", after(&bytes, "tokenizer.ggml.merges") + 8, &huge),
            vec!["array-length.gguf", "`tokenizer.ggml.merges`: the length of an array of string is 4611686018427387904 (2^62)"],
        ),
        (
            // Name, dimension count, then the innermost dimension.
            patched(&dir, "dim.gguf", after(&bytes, "blk.0.attn_norm.weight") + 4, &(1u64 << 40).to_le_bytes()),
            vec!["dim.gguf", "tensor `blk.0.attn_norm.weight` (shape [1099511627776], F32)", "run past the end of the file"],
        ),
        (
            // Key, value type (u32), then the value.
            patched(&dir, "block-count.gguf", after(&bytes, "llama.block_count") + 4, &1_000_000_000u32.to_le_bytes()),
            vec!["block-count.gguf", "field `llama.block_count`: 1000000000 implies", "but the file holds 39904 bytes"],
        ),
    ];
    for (path, needles) in cases {
        fails_with_all(&refs(&generate(&path, &[])), &needles);
    }
}

#[test]
fn lying_safetensors_and_configs_exit_2_naming_the_file_and_field() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("engine/tests/data/tiny");
    let copy = |name: &str| {
        let dir = temp("bad-model", name);
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(tiny.join(file), dir.join(file)).unwrap();
        }
        dir
    };
    let header = copy("header-length");
    let mut bytes = std::fs::read(header.join("model.safetensors")).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(header.join("model.safetensors"), bytes).unwrap();

    let layers = copy("layers");
    let config = std::fs::read_to_string(layers.join("config.json")).unwrap();
    let config = config.replace(
        "\"num_hidden_layers\": 2",
        "\"num_hidden_layers\": 1000000000",
    );
    std::fs::write(layers.join("config.json"), config).unwrap();

    let out = temp("bad-model", "out");
    let w = workload();
    let run = |weights: &Path| -> Vec<String> {
        [
            "engine",
            "run",
            "--backend",
            "cpu",
            "--weights",
            &weights.display().to_string(),
            "-w",
            &w,
            "--out",
            &out.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    fails_with_all(
        &refs(&run(&header)),
        &[
            "header-length",
            "model.safetensors",
            "header length 1152921504606846976 (2^60) exceeds the file size of 256704 bytes",
        ],
    );
    fails_with_all(
        &refs(&run(&layers)),
        &[
            "config.json",
            "field `num_hidden_layers`: 1000000000 implies",
            "model.safetensors holds 256704 bytes",
        ],
    );
    assert!(!out.exists(), "a failed run wrote {}", out.display());
}

#[test]
fn pools_larger_than_memory_exit_2_with_the_bytes_needed_and_available() {
    let gguf = fixture().display().to_string();
    fails_with_all(
        &refs(&generate(&gguf, &["--block-size", "4294967295"])),
        &[
            "--block-size 4294967295",
            "the KV pool (1 block of",
            "bytes needed, but only",
            "bytes of memory are available",
        ],
    );
    let out = temp("bad-model", "pools");
    let w = workload();
    let out_text = out.display().to_string();
    for (flag, pool) in [
        ("--gpu-kv-blocks", "the GPU KV pool (4000000000 blocks"),
        ("--host-kv-blocks", "the host KV pool (4000000000 blocks"),
    ] {
        fails_with_all(
            &[
                "engine",
                "run",
                "--backend",
                "cpu",
                "--model",
                "tiny",
                "-w",
                &w,
                flag,
                "4000000000",
                "--out",
                &out_text,
            ],
            &["sizing the KV pools", pool, "bytes needed, but only"],
        );
    }
    assert!(!out.exists(), "a failed run wrote {}", out.display());
}

#[test]
fn chat_renders_the_template_stored_in_the_gguf_or_falls_back_to_chatml() {
    let gguf = fixture().display().to_string();
    let stdout = succeeds(&refs(&generate(&gguf, &["--chat"])));
    assert!(
        stdout.contains("chat_template ") && stdout.contains("metadata `tokenizer.chat_template`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("---\n<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"),
        "{stdout}"
    );

    let out = run_limited(&refs(&generate(
        &gguf,
        &["--chat", "--system", "Be brief."],
    )));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("---\n<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"),
        "{stdout}"
    );

    // The same file with the key renamed (same length) has no template: plain ChatML.
    let bytes = std::fs::read(fixture()).unwrap();
    let key = after(&bytes, "tokenizer.chat_template") - 1;
    let plain = patched(&temp("bad-model", "no-template"), "plain.gguf", key, b"X");
    let stdout = succeeds(&refs(&generate(&plain, &["--chat"])));
    assert!(
        stdout.contains("chat_template the built-in ChatML template"),
        "{stdout}"
    );
    assert!(
        stdout.contains("---\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"),
        "{stdout}"
    );

    fails_with(&refs(&generate(&gguf, &["--system", "x"])), "--chat");
}
