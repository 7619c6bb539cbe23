#!/usr/bin/env bash
# Calibrates one card from scratch with a prebuilt release binary (built with --features cuda):
# profiling grid -> fit from the grid alone, for llama2-7b and llama3.1-8b.
#   calibration/scripts/calibrate_card.sh /path/to/djinn <card-label> [budget-s per model]
# Writes calibration/profiles/<card>-<model>-fitted.json and results/<card>/grid-<model>/ and
# results/<card>/fit-<model>.txt. Each grid takes at most its budget (default 300 s).
set -euo pipefail
djinn=${1:?usage: calibrate_card.sh DJINN_BINARY CARD_LABEL [BUDGET_S]}
card=${2:?usage: calibrate_card.sh DJINN_BINARY CARD_LABEL [BUDGET_S]}
budget=${3:-300}
case "$card" in
  h100*) card_spec=h100-sxm ;;
  h200*) card_spec=h200 ;;
  *) card_spec=h100-sxm ;;
esac
mkdir -p "results/$card" calibration/profiles
for model in llama2-7b llama3.1-8b; do
  grid="results/$card/grid-$model"
  "$djinn" calibrate profile --model "$model" --card "$card_spec" --budget-s "$budget" --out "$grid"
  "$djinn" calibrate fit --grid "$grid" --model "$model" --card "$card_spec" \
    --name "$card-$model-fitted" -o "calibration/profiles/$card-$model-fitted.json" \
    | tee "results/$card/fit-$model.txt"
done
