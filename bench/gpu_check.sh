#!/usr/bin/env bash
# The one prepared GPU call: build cim_ext for sm_90 with every core, then run the stages below in order of value,
# each bounded by what is left of the deadline, writing as it goes:
#   tests     the CUDA tests (pytest -m cuda): parallel with pytest-xdist and a per-test timeout with pytest-timeout
#             where installed, else serially with each test file under `timeout`
#   bench     the kernel benchmarks (python -m bench: CUDA events, cold L2), without the torch.compile baselines
#   steps     training-step throughput (python -m bench.steps, short --min-time) with the projected GPU-hours of the
#             ImageNet-1000 B0 10-phase schedule, and of ImageNet-100 B0 10 phases from it (bench.steps --project)
#   train     the default training run on device=cuda (python -m training.run)
#   datapath  the data-path probe (python -m bench.datapath) against the steps' rates
#   compiled  the torch.compile baselines, merged into the bench result: they compile slowly, so the deadline cuts
#             them first
# Every log and JSON goes into ONE archive, $out/gpu-check.tar.gz, packed again after each stage (a call killed at
# its limit still returns what finished); each stage's summary is printed as it ends, and all of them again at the
# end (also packed as summary.txt).
#
# Usage: bash bench/gpu_check.sh [--deadline S] [--out DIR] [--stages LIST] [--dry-run]
#   --deadline S   seconds, from the start, for everything including the build (default 540)
#   --out DIR      output folder (default: $OUT, else bench/results/gpu-check)
#   --stages LIST  comma-separated subset of build,tests,bench,steps,train,datapath,compiled (default: all)
#   --dry-run      on CPU, no build (the checkout's own build is used): every stage's command on tiny inputs
#                  (--device cpu, --quick), so that a typo cannot waste GPU minutes
# Environment: PYTHON (default python3). Exit status: 0 when every stage ran and passed, 1 when one failed, was cut
# or was skipped, 2 for bad arguments, 3 when the build failed.
set -uo pipefail

ALL_STAGES=build,tests,bench,steps,train,datapath,compiled
deadline=540 out=${OUT:-bench/results/gpu-check} stages=$ALL_STAGES dry=0

fail_usage() { echo "gpu_check.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --deadline) [ $# -ge 2 ] || fail_usage "--deadline: expected seconds"; deadline=$2; shift 2 ;;
    --out) [ $# -ge 2 ] && [ -n "$2" ] || fail_usage "--out: expected a folder"; out=$2; shift 2 ;;
    --stages) [ $# -ge 2 ] || fail_usage "--stages: expected a list"; stages=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) fail_usage "unknown argument '$1' (see --help)" ;;
  esac
done
[[ $deadline =~ ^[0-9]+$ ]] && [ "$deadline" -gt 0 ] \
  || fail_usage "--deadline: expected a positive whole number of seconds, got '$deadline'"
IFS=, read -ra chosen <<< "$stages"
[ ${#chosen[@]} -gt 0 ] || fail_usage "--stages: expected at least one of $ALL_STAGES"
for s in "${chosen[@]}"; do
  [[ ",$ALL_STAGES," == *",$s,"* ]] || fail_usage "--stages: unknown stage '$s' (one of $ALL_STAGES)"
done
wants() { [[ ",$stages," == *",$1,"* ]]; }

out=$(mkdir -p "$out" 2>/dev/null && cd "$out" && pwd) || fail_usage "--out: cannot create the folder '$out'"
export PYTHONUNBUFFERED=1 PY=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d /tmp/gpu-check.XXXXXX)
scratch=$(mktemp -d /tmp/gpu-check-scratch.XXXXXX)  # run directories and the like: not packed
trap 'rm -rf "$work" "$scratch"' EXIT
export WORK=$work SCRATCH=$scratch
RESERVE=15  # seconds kept at the end for packing and the summary

if [ "$dry" = 1 ]; then
  export DEVICE=cpu QUICK=--quick BENCH_K="not compiled and test_compress" \
         COMPILED_K="compiled and test_rational and not forward_backward" \
         TEST_FILES="tests/test_compress.py tests/test_rational.py" STEPS_MIN_TIME=0 \
         TRAIN_SET="device=cpu progress=false data_options.num_classes=4 data_options.train_per_class=6 \
data_options.test_per_class=2 image_size=16 backbone=resnet8 init_cls=2 increment=2 memory_size=8 init_epochs=1 \
incre_epochs=1 compression_epochs=1 batch_size=8 meta_batch_size=4 cam_batch_size=8 cam_update_interval=1 workers=0 \
tensorboard=false"
else
  export DEVICE=cuda QUICK= BENCH_K="not compiled" COMPILED_K=compiled TEST_FILES=tests STEPS_MIN_TIME=0.5 \
         TRAIN_SET="device=cuda progress=false"
fi

# ------------------------------------------------------------------------------------------------------ stages
# Each runs in its own bash (under `timeout`), reading the exported variables; BUDGET is its share of the time.
stage_build() {
  export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc)
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  if [ "$DEVICE" = cpu ]; then  # dry run: setup.py's configuration only, and the checkout's existing build
    $PY setup.py --name && $PY -c "import cim_ext; print('cim_ext', cim_ext.__file__)"
    return
  fi
  start=$(date +%s)
  $PY setup.py build_ext --inplace || return
  echo "build took $(( $(date +%s) - start )) s"
  $PY -c "import cim_ext; assert cim_ext.cuda_compiled(), 'no CUDA kernels in the build'; print('cuda_compiled True')"
}

stage_tests() {
  # pytest-timeout's limit per test, or `timeout`'s per file, whichever this machine has
  local per_test=120 per_file=240 args=(-m cuda -q -p no:cacheprovider -o addopts= -rfE)
  if $PY -c "import xdist" 2>/dev/null; then
    args+=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
    echo "pytest-xdist: ${args[*]: -1} workers"
  else
    echo "pytest-xdist not installed: serial"
  fi
  if $PY -c "import pytest_timeout" 2>/dev/null; then
    echo "pytest-timeout: $per_test s per test"
    # shellcheck disable=SC2086
    $PY -m pytest $TEST_FILES "${args[@]}" --timeout "$per_test"
    return
  fi
  echo "pytest-timeout not installed: $per_file s per test file (timeout)"
  local status=0 f files
  # shellcheck disable=SC2086
  files=$(find $TEST_FILES -name 'test_*.py' | sort)
  for f in $files; do
    grep -qE 'mark\.cuda|cpu_and_cuda|needs_cuda' "$f" || continue  # files without CUDA tests
    echo "--- $f"
    timeout -k 10 "$per_file" $PY -m pytest "$f" "${args[@]}"
    case $? in 0|5) ;; 124|137) echo "$f: cut after $per_file s"; status=1 ;; *) status=1 ;; esac
  done
  return $status
}

stage_bench() {
  # shellcheck disable=SC2086
  $PY -m bench --device "$DEVICE" $QUICK -k "$BENCH_K" --time-limit "$(( BUDGET - 20 ))" --out "$WORK/bench.json"
}

stage_steps() {  # bench.steps projects ImageNet-1000 B0 10 phases itself; ImageNet-100 from its JSON
  # the cases the projections need first, so that a cut keeps them
  local status=0 cases=train0,boost,student,meta0,meta,infer,memory,meta0_first_order,meta_first_order
  # shellcheck disable=SC2086
  timeout -k 10 "$(( BUDGET - 15 ))" $PY -m bench.steps --device "$DEVICE" $QUICK --min-time "$STEPS_MIN_TIME" \
    --cases "$cases" --out "$WORK/steps.json" || status=$?
  $PY -m bench.steps --project "$WORK/steps.json" --config imagenet100 --out "$WORK/projection-imagenet100.json" \
    || status=1
  return $status
}

stage_train() {
  local status=0 f
  # shellcheck disable=SC2086
  $PY -m training.run --set $TRAIN_SET --out "$SCRATCH/run" || status=$?
  for f in config.json summary.json metrics.jsonl; do
    [ -f "$SCRATCH/run/$f" ] && cp "$SCRATCH/run/$f" "$WORK/train-$f"
  done
  return $status
}

stage_datapath() {
  local steps=()
  [ -f "$WORK/steps.json" ] && steps=(--steps "$WORK/steps.json")
  # shellcheck disable=SC2086
  $PY -m bench.datapath --device "$DEVICE" $QUICK "${steps[@]}" --out "$WORK/datapath.json"
}

stage_compiled() {
  local merge=()
  [ -f "$WORK/bench.json" ] && merge=(--merge "$WORK/bench.json")
  # shellcheck disable=SC2086
  $PY -m bench --device "$DEVICE" $QUICK -k "$COMPILED_K" --time-limit "$(( BUDGET - 20 ))" "${merge[@]}" \
    --out "$WORK/bench.json"
}
export -f stage_build stage_tests stage_bench stage_steps stage_train stage_datapath stage_compiled

# What each stage's summary shows of its log: an extended regular expression and a line count from the end.
declare -A SHOW=(
  [build]='took|cuda_compiled|cim_ext|Error|error:'
  [tests]='passed|failed|error|skipped|no tests ran|^FAILED|^ERROR|cut after'
  [bench]=' kernel |other processes|cut at|no case'
  [steps]='^(case|train0|boost|student|meta[a-z0-9_]*|infer|memory) +|projected|speed-up|quick sizes'
  [train]='.' [datapath]='workers=|device|fed|no step rate|not representative' [compiled]=' compiled |cut at|no case'
)
declare -A LINES=([build]=4 [tests]=12 [bench]=24 [steps]=24 [train]=6 [datapath]=8 [compiled]=8)
declare -A CAP=([build]=300 [tests]=150 [bench]=150 [steps]=150 [train]=120 [datapath]=100 [compiled]=600)
declare -A MIN=([build]=60 [tests]=30 [bench]=40 [steps]=60 [train]=30 [datapath]=40 [compiled]=40)
if [ "$dry" = 1 ]; then MIN=([build]=10 [tests]=10 [bench]=25 [steps]=30 [train]=10 [datapath]=10 [compiled]=25); fi

summary=$work/summary.txt status=0
note() { echo "$*" | tee -a "$summary"; }
pack() {
  tar -czf "$out/.gpu-check.tar.gz" -C "$work" . && mv "$out/.gpu-check.tar.gz" "$out/gpu-check.tar.gz"
}

run_stage() {  # name: run it within min(CAP, time left - RESERVE) seconds, or skip it when that is under MIN
  local name=$1 left budget rc started
  left=$(( deadline - SECONDS - RESERVE ))
  budget=$(( CAP[$name] < left ? CAP[$name] : left ))
  if [ "$budget" -lt "${MIN[$name]}" ]; then
    note "== $name: SKIPPED ($left s left of the deadline, needs ${MIN[$name]} s)"
    status=1
    return
  fi
  started=$SECONDS
  BUDGET=$budget timeout -k 10 "$budget" bash -c "stage_$name" > "$work/$name.log" 2>&1
  rc=$?
  case $rc in
    0) note "== $name: ok in $(( SECONDS - started )) s" ;;
    124|137) note "== $name: CUT at its $budget s (deadline)"; status=1 ;;
    *) note "== $name: FAILED (exit $rc) after $(( SECONDS - started )) s"; status=1 ;;
  esac
  grep -aE "${SHOW[$name]}" "$work/$name.log" | tail -n "${LINES[$name]}" | sed 's/^/   /' | tee -a "$summary"
  pack
  return $rc
}

# ------------------------------------------------------------------------------------------------------ run
{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $(nproc)  deadline: $deadline s  dry run: $dry"
  echo "git: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null)" \
       "$(git -C "$repo" status --short 2>/dev/null | wc -l) changed files"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; cuda = torch.cuda.is_available()
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if cuda else None)"
  for m in xdist pytest_timeout pytest_benchmark; do
    $PY -c "import $m" 2>/dev/null && echo "$m: yes" || echo "$m: no"
  done
} > "$work/environment.txt" 2>&1
note "gpu_check: $(head -1 "$work/environment.txt")"
grep -aE '^torch|NVIDIA|: (yes|no)$' "$work/environment.txt" | tr '\n' ';' | sed 's/;$/\n/; s/^/   /' | tee -a "$summary"
pack

if wants build; then
  run_stage build || { note "gpu_check: the build failed; nothing else can run"; pack; exit 3; }
fi
for s in tests bench steps train datapath compiled; do
  wants "$s" && run_stage "$s"
done
note "gpu_check: done in $SECONDS s of $deadline; archive $out/gpu-check.tar.gz"
echo
echo "== summary"
grep -a '^== \|^gpu_check' "$summary"
pack
exit $status
