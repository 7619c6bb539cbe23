//! Bad `turns` replay files on the command line: each exits 2 with a message naming the file,
//! the line and the column; a good one runs byte-identically twice with more agents than the
//! file has sessions (cycling).

use std::path::Path;

mod common;
use common::{djinn, fails_with, temp};

const SPEC: &str = "schema_version = 1\nname = \"t\"\nagents = 2\nmax_context_tokens = 4096\n\
[arrival]\nkind = \"ramp\"\nramp_s = 1.0\n[replay]\nformat = \"turns\"\npath = \"FILE\"\nCYCLE\n\
[hint]\nkind = \"exact\"\n";

const GOOD: &str = "session,turn,new_tokens,output_tokens,pause_s\n\
a,0,100,10,1.5\n\
a,1,20,10,\n\
b,0,80,5,0.5\n\
b,1,10,5,\n";

/// Writes `file` with `body` and a spec naming it (relative) into `dir`; returns the spec path.
fn setup(dir: &Path, file: &str, body: &str, cycle: bool) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(file), body).unwrap();
    let spec = SPEC
        .replace("FILE", file)
        .replace("CYCLE", if cycle { "cycle = true" } else { "" });
    let path = dir.join("w.toml");
    std::fs::write(&path, spec).unwrap();
    path.display().to_string()
}

#[test]
fn bad_turn_files_exit_2_naming_file_line_and_column() {
    let dir = temp("turns", "bad");
    let cases: &[(&str, &str, &str)] = &[
        ("session,turn,new_tokens,pause_s\na,0,1,\n", "bad.csv", "line 1: column `output_tokens`: missing"),
        ("session,turn,new_tokens,output_tokens,pause_s,prefix_group\na,0,1,1,,sys\n", "bad.csv", "line 2: column `prefix_group`: names \"sys\", but the spec declares no [[prefix_groups]]"),
        ("session,turn,new_tokens,output_tokens\na,0,1,1\n", "bad.csv", "line 1: column `pause_s`: missing"),
        ("session,turn,new_tokens,output_tokens,pause_s,time_s\na,0,1,1,,0\n", "bad.csv", "line 1: column `time_s`: give either"),
        ("session,turn,new_tokens,output_tokens,pause_s\na,0,1,1,1\na,1,x1,1,\n", "bad.csv", "line 3: column `new_tokens`: not a number"),
        ("session,turn,new_tokens,output_tokens,pause_s\na,0,1,1,-2\na,1,1,1,\n", "bad.csv", "line 2: column `pause_s`: must be a finite number >= 0"),
        ("session,turn,new_tokens,output_tokens,pause_s\na,0,1,1,1\nb,0,1,1,\na,0,1,1,\n", "bad.csv", "line 4: column `turn`: session \"a\" turn 0 given twice (also line 2)"),
        ("session,turn,new_tokens,output_tokens,pause_s\na,0,99999999999,1,\n", "bad.csv", "line 2: column `new_tokens`: must be at most"),
        ("session,turn,new_tokens,output_tokens,pause_s\na,1e300,1,1,\n", "bad.csv", "line 2: column `turn`: must be at most"),
        ("session,turn,new_tokens,output_tokens,pause_s\na,0,1,1,\na,1,1,1,\n", "bad.csv", "line 2: column `pause_s`: empty, but this is not the session's last turn"),
        ("session,turn,new_tokens,output_tokens,pause_s,context_tokens\na,0,10,1,1,10\na,1,5,1,,99\n", "bad.csv", "line 3: column `context_tokens`: must lie between"),
        ("session,turn,new_tokens,output_tokens,pause_s\na,0,1,1,1\na,1,1,1\n", "bad.csv", "line 3"),
        ("{\"session\": \"a\", \"turn\": 0, \"new_tokens\": 1, \"output_tokens\": 1, \"time_s\": 5}\n{\"session\": \"a\", \"turn\": 1, \"new_tokens\": 1, \"output_tokens\": 1, \"time_s\": 4}\n", "bad.jsonl", "line 2: column `time_s`: 4 is before"),
        ("{\"session\": \"a\", \"turn\": 0, \"new_tokens\": 1, \"output_tokens\": 1, \"size\": 4}\n", "bad.jsonl", "line 1: column `size`: unknown column"),
        ("{\"session\": \"a\", \"turn\": 0, \"new_tokens\": [1], \"output_tokens\": 1}\n", "bad.jsonl", "line 1: column `new_tokens`: expected a number"),
    ];
    for (body, file, needle) in cases {
        let spec = setup(&dir, file, body, true);
        fails_with(&["simulate", "-w", &spec, "-p", "vllm", "--no-write"], file);
        fails_with(
            &["simulate", "-w", &spec, "-p", "vllm", "--no-write"],
            needle,
        );
    }
    // More agents than sessions without cycling.
    let spec = setup(&dir, "good.csv", GOOD, false);
    fails_with(
        &[
            "simulate",
            "-w",
            &spec,
            "-p",
            "vllm",
            "--no-write",
            "--agents",
            "3",
        ],
        "good.csv: field `sessions`: 3 agents asked for, but the file holds 2 sessions",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cycled_replay_runs_byte_identically_twice() {
    let dir = temp("turns", "twice");
    let spec = setup(&dir, "good.csv", GOOD, true);
    let mut digests = Vec::new();
    for run in ["one", "two"] {
        let out = dir.join(run);
        let status = djinn()
            .args([
                "simulate", "-w", &spec, "-p", "djinn", "-p", "vllm", "--agents", "7",
            ])
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let mut files = Vec::new();
        collect(&out, &mut files);
        files.sort();
        assert!(files.iter().any(|(p, _)| p.ends_with("turns.csv")));
        let turns: usize = files
            .iter()
            .filter(|(p, _)| p.ends_with("turns.csv"))
            .map(|(_, b)| b.iter().filter(|&&c| c == b'\n').count() - 1)
            .sum();
        // 7 agents of two turns each, under two policies.
        assert_eq!(turns, 2 * 7 * 2);
        digests.push(files);
    }
    assert_eq!(digests[0], digests[1]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every file under `root` as (path relative to root, bytes).
fn collect(root: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
}
