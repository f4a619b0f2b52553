#!/usr/bin/env bash
# The study of docs/results.md, run from the repository root. Each finished variant's result
# lands in docs/results/<study>/results/ as it finishes; the run folders go to runs/compare-mawps
# (not committed), shared by the steps, so a run is trained once. Rerunning this script
# continues where it stopped.
set -euo pipefail
RECIPE=recipes/compare-mawps-smollm2.yaml
ESSENTIAL=lora,sara,mosara:tau=0.5,lora:rank=1     # LoRA r2, SARA matched to it, Mo-SARA and its control LoRA r1
RUNS=(--budget lora-rank=2 --runs-dir runs/compare-mawps)
# 1. The essential arms at two seeds, at fixed rates: the paper's (1:10:100) times 10.
sara compare $RECIPE --methods $ESSENTIAL --seeds 0,1 --lr lora=3e-3,sara=3e-2,mosara=3e-1 \
    --out docs/results/mawps-smollm2 "${RUNS[@]}"
# 2. The same arms with a two-point grid per method (the paper's rates times 10 and times 33),
#    chosen at seed 0.
GRID=lora=3e-3:1e-2,pissa=3e-3:1e-2,sorsa=3e-3:1e-2,sara=3e-2:1e-1,mosara=3e-1:1
sara compare $RECIPE --methods $ESSENTIAL --seeds 0,1 --lr-grid $GRID \
    --out docs/results/mawps-smollm2-grid "${RUNS[@]}"
# 3. Every arm at three seeds on the same grid (reuses what step 2 finished).
sara compare $RECIPE --methods $ESSENTIAL,pissa,sorsa,sara:tau=0.01 --seeds 0,1,2 --lr-grid $GRID \
    --out docs/results/mawps-smollm2-grid "${RUNS[@]}"
