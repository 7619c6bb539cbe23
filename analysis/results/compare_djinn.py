# Does `djinn` win or tie against the policy zoo? Per (workload, agents).
#
# Usage: python3 analysis/results/compare_djinn.py RESULTS.csv [MORE.csv ...] [--tie 0.01]
#        (RESULTS.csv: rows of `djinn sweep`, e.g. analysis/sweeps/zoo-wins.toml)
#
# For each workload and agent count (and override, if the sweep has several), over the seeds:
# - P99 = the mean over seeds of each run's P99 turn latency (ms);
# - a policy that completed fewer turns than djinn (it rejected some) is not comparable on P99 and
#   cannot beat djinn; one that completed more turns beats djinn whatever its P99;
# - djinn ties when its P99 is within the tie tolerance (default 1%) of the best online policy's
#   (the references `offline` and `djinn-true-pauses` excluded), wins when below it, and LOSES when above it by more than the tolerance;
# - "gap" = djinn P99 / the `offline` reference's P99 - 1 (flagged above 10%).
# Prints one line per row and a tally; exit status 0 (a report, not a test).
import collections
import csv
import sys

args = sys.argv[1:]
tie = 0.01
if "--tie" in args:
    i = args.index("--tie")
    tie = float(args[i + 1])
    del args[i : i + 2]
if not args:
    sys.exit(__doc__ or "usage: compare_djinn.py RESULTS.csv [...] [--tie 0.01]")

rows = [r for path in args for r in csv.DictReader(open(path))]
# (workload, override, agents, policy) -> [sum p99, sum completed, runs]
agg = collections.defaultdict(lambda: [0.0, 0, 0])
for r in rows:
    k = (r["workload"], r.get("override", "base"), int(r["agents"]), r["policy"])
    a = agg[k]
    a[0] += float(r["latency_ms_p99"])
    a[1] += int(r["turns_completed"])
    a[2] += 1

groups = sorted({k[:3] for k in agg})
overrides = {g[1] for g in groups}
tally = collections.Counter()
print(
    f"{'workload':18} {'n':>5} {'djinn p99':>10} {'best other':>22} {'p99':>10} "
    f"{'margin':>8} {'offline':>10} {'gap':>6}  verdict"
)
for w, ov, n in groups:
    pol = {
        k[3]: (v[0] / v[2], v[1] / v[2])
        for k, v in agg.items()
        if k[:3] == (w, ov, n)
    }
    if "djinn" not in pol:
        continue
    d_p99, d_done = pol["djinn"]
    others = {
        p: v for p, v in pol.items() if p not in ("djinn", "djinn-true-pauses", "offline")
    }
    more_done = [p for p, v in others.items() if v[1] > d_done + 0.5]
    comparable = {p: v for p, v in others.items() if v[1] >= d_done - 0.5}
    best = min(comparable.items(), key=lambda pv: (pv[1][0], pv[0]), default=None)
    o = pol.get("offline")
    gap = d_p99 / o[0] - 1 if o and o[0] > 0 else float("nan")
    if more_done:
        verdict = "LOSS (completes fewer turns than " + ",".join(sorted(more_done)) + ")"
    elif best is None:
        verdict = "win (no comparable policy)"
    else:
        margin = d_p99 / best[1][0] - 1
        if margin > tie:
            verdict = f"LOSS to {best[0]}"
        elif margin > 0:
            verdict = "tie"
        else:
            verdict = "win"
    tally[verdict.split()[0]] += 1
    if gap > 0.10:
        verdict += f"; offline gap {gap:.0%} > 10%"
        tally["offline-gap"] += 1
    label = w if len(overrides) == 1 else f"{w}/{ov}"
    best_name, best_p99 = (best[0], best[1][0]) if best else ("-", float("nan"))
    margin_s = f"{d_p99 / best_p99 - 1:+.1%}" if best else "-"
    o_s = f"{o[0]:10.0f}" if o else f"{'-':>10}"
    print(
        f"{label:18} {n:5} {d_p99:10.0f} {best_name:>22} {best_p99:10.0f} "
        f"{margin_s:>8} {o_s} {gap:+6.1%}  {verdict}"
    )
print(
    f"\n{len(groups)} rows: {tally['win']} win, {tally['tie']} tie (within {tie:.0%}), "
    f"{tally['LOSS']} loss; {tally['offline-gap']} with djinn more than 10% above offline"
)
