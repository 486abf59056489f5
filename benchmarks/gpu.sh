#!/usr/bin/env bash
# The performance numbers to take the first time a CUDA machine is at hand (under 8 minutes there):
#
#   benchmarks/gpu.sh          1. a full-size SmolVLA training step: stock LeRobot vs our vision-level and
#                                 prefix-level caches, fp32 and bf16, batch 1 and 2 (ratios, steps/s, peak memory);
#                              2. an end-to-end stage at full size on 640x480 video-stored data: stock
#                                 `lerobot-train` vs `kuavo-train train`, same steps (samples/s, steps/s, ratio).
#   benchmarks/gpu.sh --quick  the same two scripts at the tiny size on the CPU: a check that they run
#                              (tests/test_benchmarks.py), no number to quote.
#
# Needs `make setup` (the venv) and the demo datasets, which are generated when missing
# (DATA_ROOT, default outputs/demo/datasets). Runs with whatever GPU torch sees as cuda:0.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
data_root=${DATA_ROOT:-outputs/demo/datasets}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

if [[ ! -f "$data_root/task1_moving_grasp/meta/info.json" ]]; then
    .venv/bin/kuavo-train make-data profile=demo data_root="$data_root"
fi

if [[ "${1:-}" == "--quick" ]]; then
    work=${WORK:-outputs/bench_gpu_quick}
    "$py" benchmarks/bench_full_size_step.py --shape tiny --device cpu --batch-sizes 2 --steps 2 --threads 1 \
        --variants stock vision prefix
    OMP_NUM_THREADS=1 "$py" benchmarks/bench_train_e2e.py --sizes tiny --video 2 --video-size 96 128 --batch-size 8 \
        --steps 4 --cache on --device cpu --data-root "$data_root" --work "$work"
else
    work=${WORK:-outputs/bench_gpu}
    "$py" benchmarks/bench_full_size_step.py --device cuda --batch-sizes 1 2 --steps 5
    "$py" benchmarks/bench_train_e2e.py --sizes full --video 3 --batch-size 2 --steps 60 --cache on --device cuda \
        --data-root "$data_root" --work "$work"
fi
