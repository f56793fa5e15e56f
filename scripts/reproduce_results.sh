#!/usr/bin/env bash
# Regenerates every figure of docs/RESULTS.md on this machine (2 CPU cores): two
# pinned 1-thread lanes side by side (workers x threads = cores), one MLflow + Optuna
# store in $FMNIST_SWEEP_DIR (default ./results), logs in $FMNIST_SWEEP_DIR/logs.
#
#   bash scripts/reproduce_results.sh            # both lanes, ~2 h
#   bash scripts/reproduce_results.sh resnet     # lane A only: the stronger family
#   bash scripts/reproduce_results.sh studies    # lane B only: the published studies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export FMNIST_SWEEP_DIR=${FMNIST_SWEEP_DIR:-$PWD/results}
mkdir -p "$FMNIST_SWEEP_DIR/logs"
# run CORE ARGS...: one command pinned to one core, one thread
run() { local core=$1; shift; echo "+ $* ($(date +%T))"; taskset -c "$core" "$PY" -m fmnist_sweep "$@" trainer.threads=1 trainer.progress=false; }

lane_resnet() {  # the stronger family: search on 30% of the data, then 3 seeds on all 60k
  run 1 +experiment=resnet_search
  run 1 finalize resnet_search --top-k 1 --seeds 3 trainer.epochs=30 data.train_fraction=1.0
}

lane_studies() {  # the two published studies, short schedules
  run 0 +experiment=keras_cnn
  for f in latent dropout lr optimizer output batch; do run 0 +experiment=torch_ae_$f; done
  run 0 +experiment=pretrain_vs_scratch
  run 0 +experiment=keras_rnn
  run 0 +experiment=keras_bilstm
}

# Create the stores once before parallel lanes (a fresh MLflow database raced by two
# processes can be corrupted).
"$PY" -c "from fmnist_sweep.config import compose; from fmnist_sweep.tracking import Tracker; \
c = compose([]); Tracker(c.tracking.uri, c.tracking.experiment, c.tracking.artifact_root)"

what=${1:-all}
pids=()
if [ "$what" = all ] || [ "$what" = resnet ]; then
  (time lane_resnet) > "$FMNIST_SWEEP_DIR/logs/resnet.log" 2>&1 &
  pids+=($!)
fi
if [ "$what" = all ] || [ "$what" = studies ]; then
  (time lane_studies) > "$FMNIST_SWEEP_DIR/logs/studies.log" 2>&1 &
  pids+=($!)
fi
echo "lanes running: logs in $FMNIST_SWEEP_DIR/logs/"
for p in "${pids[@]}"; do wait "$p"; done
echo "done; tables: $PY -m fmnist_sweep compare ... (see docs/RESULTS.md)"
