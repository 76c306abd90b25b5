#!/usr/bin/env bash
# Every GPU figure issue 10 asks for, in one run on a lent device (see /work/.library/device/):
# the kernel routes and their exactness on the GPU (tests/test_cuda.py), the pipeline against
# OSEDiff's graph, the CLI end to end, peak CUDA memory, fp16 finiteness. Stage the wheels first
# (../shared/tools/device-wheels), carry .wheels-device, and run `bash benchmarks/gpu_check.sh`
# after the install line that script prints. Logs go to
# $OUT (or ./gpu-check), one file per step; each step has its own time limit so one slow step
# cannot take the others' time, and the limits add up to 560 s: under the device's 600 s a call.
set -u
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-}:$PWD
export ICMSR_CACHE_DIR=/tmp/icmsr-cache
export PYTHONUNBUFFERED=1  # a step cut off by its limit keeps what it printed
step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "exit $?"; tail -n 40 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1; cat "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# the start every CLI run pays before any model work: imports (no diffusers since 2026-12-03), CUDA context
step startup 15 python3 -c "import time; t = time.perf_counter(); import torch; a = time.perf_counter(); torch.zeros(1, device='cuda'); torch.cuda.synchronize(); b = time.perf_counter(); import icmsr_cli.model.loading, icmsr_cli.cli; c = time.perf_counter(); print(f'import torch {a - t:.2f} s, CUDA context {b - a:.2f} s, icmsr (model code, CLI) {c - b:.2f} s')"
step model 60 python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from _models import random_model; print(random_model('full'))"
# the bars first (process wall of the CLI as users run it), so a device cut short still answers them
step e2e 100 python3 benchmarks/speed.py --device cuda --e2e-only
# fp16 on the GPU gives a file (a per-stage fallback to fp32 is allowed, and says so)
step fp16 40 bash -c 'python3 -c "import numpy as np; from PIL import Image; Image.fromarray((np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)).save(\"/tmp/in128.png\")" &&
  python3 -m icmsr_cli upscale /tmp/in128.png -o /tmp/out-fp16.png --dtype fp16 --overwrite \
    --base benchmarks/.models/full/base --lora benchmarks/.models/full/osediff.pkl && python3 -c "from PIL import Image; print(Image.open(\"/tmp/out-fp16.png\").size)"'
step speed 120 python3 benchmarks/speed.py --device cuda --skip-e2e
# the tiled path against the whole image (the 1.3x bar): the tile --tile auto takes where it must tile, 128 and 64
step tiled 30 python3 benchmarks/tiled.py --device cuda --sizes 2048x2048 --tiles auto,128,64 --batches 4,1 --repeats 2
step tests 60 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py  # the CUDA routes' exactness and layout
step kernels 60 python3 benchmarks/kernels.py --device cuda
step memory 75 python3 benchmarks/memory.py --model full --device cuda --sizes 1024,2048,4096,8192
