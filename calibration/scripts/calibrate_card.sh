#!/usr/bin/env bash
# Calibrates and validates one card from scratch with a prebuilt release binary (built with
# --features cuda), for llama2-7b and llama3.1-8b:
#   1. profiling grid        djinn calibrate profile   (BUDGET s per model, default 120)
#   2. fit from the grid     djinn calibrate fit --grid (seconds, CPU)
#   3. held-out validation   djinn calibrate validate-suite with the fitted profile, recorded into it
#
#   calibration/scripts/calibrate_card.sh /path/to/djinn <card-label> [grid budget-s per model] [models]
#
# models: comma-separated, default llama2-7b,llama3.1-8b (one model alone takes about half the time).
#
# Writes calibration/profiles/<card>-<model>-fitted.json (with provenance.validation) and under
# results/<card>/: grid-<model>/, fit-<model>.txt, validation-suite-<model>/ (the real run
# directories) and calibration-validation-suite-<model>.{csv,txt}.
#
# Planned GPU time per card (estimated from the scaled workloads' simulated durations on the
# analytic H100 profile; docs/calibration.md): grids 2 x 120 s; suites ~135 s (llama2-7b, 5
# workloads x 3 policies) and ~250 s (llama3.1-8b, 6 workloads) of runs plus ~15 s of engine
# start-up per workload: about 13.5 minutes in all. An interrupted suite resumes with the same
# command (its finished runs are kept).
set -euo pipefail
usage="usage: calibrate_card.sh DJINN_BINARY CARD_LABEL [GRID_BUDGET_S] [MODELS]"
djinn=${1:?$usage}
card=${2:?$usage}
budget=${3:-120}
models=${4:-llama2-7b,llama3.1-8b}
case "$card" in
  h100*) card_spec=h100-sxm ;;
  h200*) card_spec=h200 ;;
  *) card_spec=h100-sxm ;;
esac
# The suite's workloads, shrunk to about a minute of GPU time each (three policies), on a 24 GiB GPU
# KV pool so that memory pressure separates the policies and the ranking check means something; the same
# scaled specs are simulated, so the comparison is like for like.
suite_scale=(--agents-scale 0.2 --turns-scale 0.1 --time-scale 0.05 --host-kv-gib 4 --gpu-kv-gib 24)
mkdir -p "results/$card" calibration/profiles
for model in ${models//,/ }; do
  grid="results/$card/grid-$model"
  profile="calibration/profiles/$card-$model-fitted.json"
  suite="results/$card/validation-suite-$model"
  if [ ! -f "$grid/grid.json" ]; then
    "$djinn" calibrate profile --model "$model" --card "$card_spec" --budget-s "$budget" --out "$grid"
  fi
  # A profile of that name fitted some other way (e.g. from workload runs) is never replaced or
  # validated in its place: only one this script fitted from a grid is reused.
  if [ -f "$profile" ] && ! grep -q '"fitted_from": *"a [0-9]*-shape grid' "$profile"; then
    echo "calibrate_card.sh: $profile exists and was not fitted from a profiling grid;" \
      "move it away or pass another CARD_LABEL" >&2
    exit 2
  fi
  if [ ! -f "$profile" ]; then
    "$djinn" calibrate fit --grid "$grid" --model "$model" --card "$card_spec" \
      --name "$card-$model-fitted" -o "$profile" | tee "results/$card/fit-$model.txt"
  fi
  "$djinn" calibrate validate-suite --model "$model" --profile "$profile" "${suite_scale[@]}" \
    --out "$suite" --reuse-runs --record-into "$profile" --overwrite
  cp "$suite/validation-suite.csv" "results/$card/calibration-validation-suite-$model.csv"
  cp "$suite/validation-suite.txt" "results/$card/calibration-validation-suite-$model.txt"
done
