#!/usr/bin/env bash
# He et al.'s Fig. 6 / Table 6 on a GPU rented for a few minutes at a time: two commands.
#
#   scripts/gpu/plan.sh calibrate DEST                 # 1st: ~3 min, no data needed
#   scripts/gpu/plan.sh train DEST NPZ [BUDGET_S] [CALIBRATION] [RECORDS...]
#                                                      # 2nd: what fits in BUDGET_S (default 480)
#
# calibrate: `experiments.device_suite --parts=calibrate` measures here what a training run
#   costs alone and 2 and 4 at once, with and without CUDA MPS, and writes
#   DEST/calibration.json and DEST/calibration_summary.md.
# train: `experiments.degradation` in the paper's recipe (`gpu_paper`: 64k steps, bf16),
#   seed 0's four nets first, then seed 1's; up to the calibrated number of runs at once,
#   and only whole runs that calibration.json predicts to end inside BUDGET_S. Each finished
#   run's record (config.json, metrics.jsonl, done.json: no checkpoints) goes to
#   DEST/records/NAME, and table.md, results.json, fig6.png to DEST. CALIBRATION defaults to
#   DEST/calibration.json; RECORDS are earlier sessions' records folders (e.g. committed under
#   docs/reproduction/CARD_DATE/records): runs recorded there are skipped, so the next
#   session continues from the repository alone.
#
# Each command ends inside its own timeout (the budget plus a minute for start-up and the
# tables), and copies what it has to DEST even when the experiment exits 3 (runs left for
# the next invocation): the copies follow `;`, never `&&`. Commit DEST's records, not the
# scratch folder's checkpoints.
set -u
mode=${1:?usage: plan.sh calibrate DEST | train DEST NPZ [BUDGET_S] [CALIBRATION] [RECORDS...]}
dest=${2:?DEST: the folder the results are copied to}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
cd "$(dirname "$0")/../.."
scratch=$(mktemp -d)
code=0
case "$mode" in
  calibrate)
    timeout 240 python -m experiments.device_suite --out="$scratch/suite" --parts=calibrate --budget_s=200; code=$?
    cp "$scratch/suite/calibration.json" "$dest/" 2>/dev/null
    cp "$scratch/suite/summary.md" "$dest/calibration_summary.md" 2>/dev/null
    ;;
  train)
    npz=${3:?NPZ: CIFAR-10 as an .npz}
    budget=${4:-480}
    calibration=${5:-$dest/calibration.json}
    records="$dest/records"
    mkdir -p "$records"
    for earlier in "${@:6}"; do records="$records,$earlier"; done
    timeout $((budget + 60)) python -m experiments.degradation --workdir="$scratch/degradation" \
      --schedule=gpu_paper --data="npz:$npz" --seeds=2 --concurrent=auto --calibration="$calibration" \
      --budget_s="$budget" --records="$records"; code=$?
    for name in table.md results.json fig6.png; do cp "$scratch/degradation/$name" "$dest/" 2>/dev/null; done
    ;;
  *)
    echo "error: unknown mode '$mode' (calibrate or train)" >&2
    exit 2
    ;;
esac
echo "plan.sh $mode: exit $code; results in $dest"
exit "$code"
