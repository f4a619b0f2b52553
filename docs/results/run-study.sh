#!/usr/bin/env bash
# The study of docs/results.md, run from the repository root. Each finished variant's result
# lands in docs/results/mawps-smollm2/results/ as it finishes; the run folders go to
# runs/compare-mawps (not committed). Rerunning this script continues where it stopped.
set -euo pipefail
RATES="lora=3e-3,pissa=3e-3,sorsa=3e-3,sara=3e-2,mosara=3e-1"   # the paper's ratios (1:10:100), x10
COMMON=(--budget lora-rank=2 --lr "$RATES" --out docs/results/mawps-smollm2 --runs-dir runs/compare-mawps)
# 1. The essential arms at two seeds: LoRA r2, SARA matched to it, Mo-SARA and its control LoRA r1.
sara compare recipes/compare-mawps-smollm2.yaml --methods lora,sara,mosara:tau=0.5,lora:rank=1 \
    --seeds 0,1 "${COMMON[@]}"
# 2. Every arm at three seeds (reuses what step 1 finished).
sara compare recipes/compare-mawps-smollm2.yaml \
    --methods lora,sara,mosara:tau=0.5,lora:rank=1,pissa,sorsa,sara:tau=0.01 --seeds 0,1,2 "${COMMON[@]}"
