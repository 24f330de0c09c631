for which in new old; do
  if [ $which = old ]; then cp docs/data/models-h200-2026-12-02/old_triton_kernel.py ftattn_torch/fused/triton_kernel.py; fi
  for c in "two same elem b30,b12" "two far b30" "two same elem b12,b3"; do
    echo -n "$which: "; timeout 60 python3 docs/data/models-h200-2026-12-02/pv_rows2.py "$c" 2>&1 | grep -v -i warn | tail -1
  done
done
