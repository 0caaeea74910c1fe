#!/usr/bin/env bash
# GPU session script: build cim_ext from source on a CUDA machine, then run the requested stages, writing logs and
# JSON results to $OUT (default bench/results/gpu-run). Stages: tests (CUDA-marked tests), bench (kernel
# benchmarks), steps (training-step throughput), ablation (the ablation on GPU). Usage:
#   bash bench/gpu_check.sh tests bench
set -uo pipefail
out=${OUT:-bench/results/gpu-run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
py=${PYTHON:-python3}
stamp() { echo "== $(date +%T) $*"; }

stamp environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.csv"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

stamp build
start=$(date +%s)
if ! $py -m pip install --no-build-isolation --no-deps -e . > /tmp/cim-build.log 2>&1; then
  cp /tmp/cim-build.log "$out/build.log"; tail -60 /tmp/cim-build.log; exit 3
fi
echo "build took $(( $(date +%s) - start )) s"
$py -c "import cim_ext, torch; assert cim_ext.cuda_compiled(); print('cuda_compiled', cim_ext.cuda_compiled())" || exit 1

status=0
for stage in "$@"; do
  stamp "$stage"
  case "$stage" in
    tests)
      $py -m pytest tests -m "cuda" -q -p no:cacheprovider -o addopts= \
        2>&1 | tee "$out/cuda-tests.log" | tail -40 || status=1 ;;
    cputests)
      $py -m pytest tests -q -p no:cacheprovider -x 2>&1 | tail -20 || status=1 ;;
    bench)
      $py -m bench --device cuda --out "$out/cuda-$(date +%F).json" 2>&1 | tee "$out/bench.log" | tail -60 || status=1 ;;
    steps)
      $py -m bench.steps --device cuda --out "$out/steps-cuda-$(date +%F).json" 2>&1 | tail -40 || status=1 ;;
    ablation)
      # ABLATION_ARGS narrows the preset (e.g. "--budgets small --seeds 3"); ABLATION_TIMEOUT bounds the runs, after
      # which the finished runs are aggregated.
      abl=($py -m training.experiments.ablation --device cuda --gpu --out "$out/ablation-gpu" --runs /tmp/ablation-runs)
      timeout "${ABLATION_TIMEOUT:-600}" "${abl[@]}" ${ABLATION_ARGS:-} 2>&1 | tail -20
      "${abl[@]}" ${ABLATION_ARGS:-} --report-only 2>&1 | tail -30 || status=1 ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done
stamp done
exit $status
