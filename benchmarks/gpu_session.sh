#!/usr/bin/env bash
# Issue 13's GPU checks as one prepared run for a lent GPU machine (the `device` tool: 15 minutes in all).
#
# Here, once, in the repository root: bash benchmarks/gpu_wheels.sh (the packages the GPU image lacks, mlflow for
# the tracking test among them, as wheels in .whl/).
# Then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590). Everything lands in $OUT:
# device.txt, tests.log (with tracebacks), core_fp32.json, core_amp.json, heart_{fp32,fp16,bf16}.json, heart3d_amp.json,
# main_job.log, main_job_compiled.log.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, monai;
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__)"; } > "$OUT/device.txt" 2>&1

# 1. the suite on a GPU machine (target 6), with the tracebacks this time
# (the image has pytest-xdist; six workers share the GPU, the torchrun tests run their ranks on the CPU)
timeout 240 python3 -m pytest -q -n 6 --timeout 200 --tb=short -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
echo "pytest exit $?" >> "$OUT/tests.log"

# 2. PGD vs torchattacks, criterion cost, AMAT vs SAT memory (targets 2, 3)
timeout 90 python3 benchmarks/bench_core.py --device cuda --repeats 5 > "$OUT/core_fp32.json" 2>&1
timeout 90 python3 benchmarks/bench_core.py --device cuda --repeats 5 --amp > "$OUT/core_amp.json" 2>&1

# 3. paper-scale Heart epochs: float32, float16 and bfloat16 autocast (targets 1, 5)
heart=(--bundle msd_heart_seg_amat --rounds 3 --spatial_size "[320,256]" --filters "[32,64,128,256,320,320]"
  --batch_size 16 --embedded_cases 8)
timeout 100 python3 benchmarks/bench_bundle_epoch.py "${heart[@]}" > "$OUT/heart_fp32.json" 2>&1
timeout 100 python3 benchmarks/bench_bundle_epoch.py "${heart[@]}" --amp True > "$OUT/heart_fp16.json" 2>&1
timeout 100 python3 benchmarks/bench_bundle_epoch.py "${heart[@]}" --amp True --amp_dtype bfloat16 \
  > "$OUT/heart_bf16.json" 2>&1

# 3b. issue 17: the 3D Heart at its real-data network and patch size (embedded volumes padded to the patch), AMP
heart3d=(--bundle msd_heart_seg_amat --overlay volumetric --rounds 2 --spatial_size "[320,256]"
  --patch_size "[160,128,80]" --filters "[32,64,128,256,320,320]"
  --strides "[[1,1,1],[2,2,2],[2,2,2],[2,2,2],[2,2,2],[2,2,1]]" --batch_size 2 --embedded_cases 8 --amp True)
timeout 90 python3 benchmarks/bench_bundle_epoch.py "${heart3d[@]}" > "$OUT/heart3d_amp.json" 2>&1
# 4. the README's main job (target 4: <= 60 s)
start=$(date +%s)
timeout 120 python3 -m monai.bundle run --config_file bundles/msd_hippocampus_seg_amat/configs/train.json \
  --output_dir /tmp/main_job > "$OUT/main_job.log" 2>&1
echo "main job training: exit $?, $(($(date +%s) - start)) s" >> "$OUT/main_job.log"
# 4b. the same with MONAI's compile flag (torch.compile of the network; compile time included)
start=$(date +%s)
timeout 120 python3 -m monai.bundle run --config_file bundles/msd_hippocampus_seg_amat/configs/train.json \
  --output_dir /tmp/main_job_compiled --train#trainer#compile True > "$OUT/main_job_compiled.log" 2>&1
echo "main job training, compiled: exit $?, $(($(date +%s) - start)) s" >> "$OUT/main_job_compiled.log"
tail -n 3 "$OUT"/*.json "$OUT"/main_job*.log
