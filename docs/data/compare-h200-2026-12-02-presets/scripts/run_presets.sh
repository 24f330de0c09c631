#!/bin/bash
# usage: bash docs/data/compare-h200-2026-12-02-presets/scripts/run_presets.sh TIMEOUT PRESET [PRESET...]  (OUT: an output folder)
export PYTHONPATH=.
t=$1; shift
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import jax, torch, triton, numpy; print(jax.__version__, torch.__version__, triton.__version__, numpy.__version__)"
for p in "$@"; do
  s=$(date +%s)
  timeout $t python3 -m compare run --preset $p --backends jax,torch --implementations triton,pallas \
     --schemes baseline,abft_all,full --out $OUT/$p > $OUT/$p.log 2>&1
  echo "== $p rc=$? $(( $(date +%s) - s )) s"
  grep -v "step " $OUT/$p.log | tail -n 60
  grep "step " $OUT/$p.log | tail -n 2
done
