"""Writes coding_agent_turns_synthetic.csv: synthetic coding-agent sessions, turn by turn.

Nothing here is measured. Each value is drawn from distributions fitted to published per-call
statistics of Claude-Code-style agents on SWE-bench tasks (166 sessions, 6,708 calls):
first-call context p50 13.4k tokens; new input tokens p50 179, p90 1,195, p99 9,825; output
tokens p50 145, p90 601, max 8,977; the pause before the next call p50 0.041 s, 61% under
0.1 s, 32% over 5 s, p99 20 s, max 308 s; 9 to 146 calls per session (p50 45). A quarter of
calls keep none of the previous call's output beyond its visible answer (the hidden reasoning
is not kept), which the file states through `context_tokens`; one session compacts its history
once its context passes 60k tokens. Standard library only; the seed fixes the file.

Run from this folder: python3 make_coding_agent_turns.py
"""

import math
import random

SESSIONS = 8
SEED = 2026
Z90 = 1.2815515655446004


def lognormal(rng, median, p90, cap):
    sigma = math.log(p90 / median) / Z90
    return min(cap, rng.lognormvariate(math.log(median), sigma))


def pause(rng):
    u = rng.random()
    if u < 0.61:
        return rng.uniform(0.01, 0.1)
    if u < 0.68:
        return rng.uniform(0.1, 5.0)
    if u < 0.995:
        return lognormal(rng, 9.0, 16.0, 60.0)
    return rng.uniform(60.0, 308.0)


def session(rng, sid, compacts):
    calls = int(min(146, max(9, lognormal(rng, 30.0, 70.0, 146.0))))
    rows = []
    sequence = 0
    for turn in range(calls):
        if turn == 0:
            new = int(lognormal(rng, 13400.0, 20000.0, 30000.0))
            context = new
        else:
            new = int(lognormal(rng, 179.0, 1195.0, 9825.0))
            context = sequence + new
            previous_output = rows[-1]["output_tokens"]
            if compacts and sequence > 60000:
                # The agent summarises its history: the system prompt and task stay (the first
                # call's prompt), a summary of a few thousand tokens is the new input.
                new = int(rng.uniform(2000, 4000))
                context = rows[0]["new_tokens"] + new
                compacts = False
            elif rng.random() < 0.25:
                # Hidden reasoning (about two thirds of the output) is not kept.
                context -= (2 * previous_output) // 3
        output = max(1, int(lognormal(rng, 145.0, 601.0, 8977.0)))
        rows.append(
            {
                "session": sid,
                "turn": turn,
                "new_tokens": new,
                "output_tokens": output,
                "pause_s": "" if turn == calls - 1 else f"{pause(rng):.3f}",
                "context_tokens": context,
            }
        )
        sequence = context + output
    return rows


def main():
    rng = random.Random(SEED)
    columns = ["session", "turn", "new_tokens", "output_tokens", "pause_s", "context_tokens"]
    with open("coding_agent_turns_synthetic.csv", "w") as out:
        out.write(",".join(columns) + "\n")
        for i in range(SESSIONS):
            for row in session(rng, f"synthetic-{i + 1:02d}", compacts=(i == 6)):
                out.write(",".join(str(row[c]) for c in columns) + "\n")


if __name__ == "__main__":
    main()
