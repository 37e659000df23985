#!/usr/bin/env bash
# GPU checks of wpeft in one unattended run (about 6 minutes on one H100/H200), from the
# repository root of a checkout on a machine that has torch, timm, peft, xarray, einops, numpy,
# scipy, pandas, safetensors and tqdm but not microsoft-aurora:
#
#   1. install the wheels carried in .whl/ (microsoft-aurora, pure Python) into /tmp/site;
#   2. print the machine (nvidia-smi, torch, CUDA);
#   3. `wpeft plan` for Aurora 1.3B (the planner itself, CPU only);
#   4. benchmarks/gpu/check_plan.py: the planner's activation estimate against exact
#      saved-tensor measurements on the GPU in bf16 (the CUDA-autocast constants);
#   5. benchmarks/bench_gpu.py --quick: step time, MFU, peak memory vs the planner for small
#      and 1.3b with full / lora / weatherpeft, eager and compiled;
#   6. one activation-checkpointing row (1.3b full) to check the planner's +ckpt peak;
#      with FULL_RES=1 also 1.3b lora at 721x1440 with checkpointing.
#
# Everything goes to $OUT (run.log, plan.txt, check_plan.md/.json, bench_gpu.md/.json,
# bench_ckpt.md/.json). Each stage has its own time limit; a failed stage is logged and the
# next one runs. DRY_RUN=1 runs the same stages on the CPU with the tiny backbone (to test
# this script on a machine without a GPU).
set -uo pipefail

OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
START=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - START )) s)"; }
check() { local rc=$?; [ "$rc" -eq 0 ] || echo "!!! stage failed with exit code $rc"; }

stage "install wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
check
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
    || echo "no nvidia-smi"
python3 - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
import aurora, peft, timm
print("aurora from", aurora.__file__, "| peft", peft.__version__, "| timm", timm.__version__)
import wpeft.backbones.aurora_adapter, wpeft.methods, wpeft.distributed.plan  # noqa: E401
print("wpeft imports ok")
EOF
check

if [ "${DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu; BACKBONES="tiny"; BIG=tiny; GRID=32x64; CHECK_BACKBONES="tiny"
else
    DEVICE=cuda; BACKBONES="small 1.3b"; BIG=1.3b; GRID=128x256; CHECK_BACKBONES="tiny small"
fi

stage "wpeft plan"
timeout 120 python3 -m wpeft.distributed.plan --backbone 1.3b --method weatherpeft --gpus 8 \
    --batch 5 --grid 128x256 --gpu-memory 80 | tee "$OUT/plan.txt"
timeout 120 python3 -m wpeft.distributed.plan --backbone 1.3b --method full --gpus 8 \
    --batch 1 --grid 721x1440 --gpu-memory 141 | tee -a "$OUT/plan.txt"
echo "(exit code 1 above only means: nothing fits)"

stage "planner activations vs measured saved tensors"
timeout 150 python3 benchmarks/gpu/check_plan.py --device "$DEVICE" \
    --backbones $CHECK_BACKBONES --out "$OUT/check_plan.md"
check

stage "bench_gpu --quick"
timeout 330 python3 benchmarks/bench_gpu.py --quick --device "$DEVICE" --backbones $BACKBONES \
    --grid "$GRID" --time-budget 220 --config-timeout 120 --out "$OUT/bench_gpu.md"
check

stage "bench_gpu with activation checkpointing"
timeout 120 python3 benchmarks/bench_gpu.py --device "$DEVICE" --backbones "$BIG" --methods full \
    --compile off --checkpointing --grid "$GRID" --steps 3 --warmup 1 --time-budget 60 \
    --out "$OUT/bench_ckpt.md"
check
if [ "${FULL_RES:-0}" = 1 ]; then
    stage "bench_gpu 721x1440 with activation checkpointing"
    timeout 240 python3 benchmarks/bench_gpu.py --device "$DEVICE" --backbones "$BIG" \
        --methods lora --compile off --checkpointing --grid 721x1440 --steps 2 --warmup 1 \
        --time-budget 60 --config-timeout 200 --out "$OUT/bench_fullres.md"
    check
fi

stage "done"
ls -la "$OUT"
