#!/usr/bin/env python3
"""Merge `djinn engine bench` (engine_bench.json) with hf_bench.py's rows (measured on the same card) into
one JSON + CSV, and print the speed-ups of the CUDA engine over each HF peer.

Usage: python3 bench_side_by_side.py engine_bench.json hf_bench.json OUT_PREFIX
"""
import csv
import json
import sys


def main():
    engine = json.load(open(sys.argv[1]))
    hf = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else []
    prefix = sys.argv[3]
    ours = engine["rows"]
    comparisons = []
    for peer in hf:
        # A chunk on a cached context is compared only with the engine's chunk on the same context.
        same = [r for r in ours if r["kind"] == peer["kind"] and r["batch"] == peer["batch"]
                and r.get("cached_tokens", 0) == peer.get("cached_tokens", 0)]
        if not same:
            continue
        mine = min(same, key=lambda r: abs(r["tokens"] - peer["tokens"]))
        speedup = peer["ms_p50"] / mine["ms_p50"]
        comparisons.append(dict(peer=peer["system"], kind=peer["kind"], batch=peer["batch"], peer_tokens=peer["tokens"],
                                engine_tokens=mine["tokens"], peer_ms=peer["ms_p50"], engine_ms=mine["ms_p50"], speedup=speedup))
        print(f"{peer['kind']:<12} batch {peer['batch']:>3}: {peer['system']:<18} {peer['ms_p50']:9.3f} ms ({peer['tokens']} tokens) "
              f"vs djinn-cuda {mine['ms_p50']:8.3f} ms ({mine['tokens']} tokens): x{speedup:.2f}")
    merged = dict(engine, rows=ours + hf, comparisons=comparisons)
    json.dump(merged, open(prefix + ".json", "w"), indent=1)
    fields = ["system", "kind", "batch", "tokens", "cached_tokens", "ms_p50", "ms_mean", "ms_min", "reps", "tokens_per_s",
              "floor_ms_datasheet", "ratio_to_datasheet_floor", "floor_ms_measured_rates", "ratio_to_measured_floor"]
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device"] + fields)
        for r in merged["rows"]:
            w.writerow([engine["device"]] + [round(r.get(k, 0), 4) if isinstance(r.get(k, 0), float) else r.get(k, 0) for k in fields])
    print(f"wrote {prefix}.json and {prefix}.csv")


if __name__ == "__main__":
    main()
