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
# 4. A third grid point per method, one step past the end each method's choice sat at (LoRA,
#    PiSSA and SARA up, SORSA and Mo-SARA down), and seeds 3 and 4 for every arm. The two-point
#    report of step 3 is kept as docs/results/step3-compare.md.
GRID3=lora=3e-3:1e-2:3e-2,pissa=3e-3:1e-2:3e-2,sorsa=1e-3:3e-3:1e-2,sara=3e-2:1e-1:3e-1,mosara=1e-1:3e-1:1
sara compare $RECIPE --methods $ESSENTIAL,pissa,sorsa,sara:tau=0.01 --seeds 0,1,2,3,4 --lr-grid $GRID3 \
    --out docs/results/mawps-smollm2-grid "${RUNS[@]}"
# 5. The larger budget, LoRA rank 8, against SARA matched to it, on a four-point grid each.
sara compare $RECIPE --methods lora,sara --seeds 0,1,2 --budget lora-rank=8 \
    --lr-grid lora=1e-3:3e-3:1e-2:3e-2,sara=1e-2:3e-2:1e-1:3e-1 \
    --runs-dir runs/compare-mawps-r8 --out docs/results/mawps-smollm2-r8
# 6. Task accuracy (mawps and SVAMP tests, first 100 of each) for the two claims' pairs, at the
#    rates step 4 chose. These retrain the variants (the runs of steps 1-4 were not kept), which
#    also checks that a rerun gives the same held-out loss.
ACC=(--task mawps,svamp --limit 100 --max-new-tokens 96 --runs-dir runs/compare-mawps-accuracy)
sara compare $RECIPE train.per_device_eval_batch_size=16 --methods lora,sara --seeds 0,1,2 \
    --lr lora=1e-2,sara=1e-1 --budget lora-rank=2 "${ACC[@]}" --out docs/results/mawps-smollm2-accuracy
sara compare $RECIPE train.per_device_eval_batch_size=16 --methods lora:rank=1,mosara:tau=0.5 --seeds 0,1,2 \
    --lr lora=3e-2,mosara=3e-1 --budget lora-rank=2 "${ACC[@]}" --out docs/results/mawps-smollm2-accuracy-small
