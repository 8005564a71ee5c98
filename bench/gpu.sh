#!/usr/bin/env bash
# The one GPU script: checks that a GPU is visible, builds fastvlp, runs the CUDA tests, then every GPU
# benchmark, most important first; results land in bench/results/<gpu>/, with this run's logs in
# bench/results/<gpu>/logs/ and its summary in bench/results/<gpu>/gpu_run.{json,md} (each step's
# outcome, and which result files this run wrote, complete or partial). Every result file records the
# run id, commit, command, host and versions. Where $OUT is set (the device machine), logs and results
# are packed into $OUT/gpu.tar.gz after every step, so a run stopped early still returns what it measured.
#
# No GPU visible or a failed build stops the run (exit 1). Failed or timed-out CUDA tests, or a test run
# in which no test passed (all skipped), are recorded in the summary and in every result file
# (provenance.gpu_tests), and make the script exit 1 at the end; so does any failed or timed-out step.
#
#   bash bench/gpu.sh                    # everything
#   BUDGET_S=420 bash bench/gpu.sh       # stop starting steps after 420 s; each is cut at what is left
#   SKIP_SANITIZER=1 bash bench/gpu.sh
#   CUDA_TESTS_CAP_S=200 bash bench/gpu.sh   # the CUDA tests cut at 200 s (default 300)
#   E2E_COMPILE=1 bash bench/gpu.sh     # the end-to-end benchmark also under torch.compile (each compiled
#                                       # measurement compiles first: 20 to 45 s each on an H100)
#   ONLY="bench-e2e bench-attention" bash bench/gpu.sh   # the checks and build, then only the steps named
#                         (profile-attention: Nsight Compute on the encoder-shape forward, where ncu exists)
#   ATTENTION_REF_COMMIT=0f64823 bash bench/gpu.sh   # also time that commit's fused attention on E and X
#                                                    # beside today's, on the same machine (a regression check)
#   RESULTS_ROOT=/tmp/r bash bench/gpu.sh   # results under /tmp/r/<gpu>/ instead of bench/results/<gpu>/
#   FASTVLP_BENCH_GIT_COMMIT=<sha> bash bench/gpu.sh   # a tree copied without .git: name its commit
#                                                     # (every file also records a digest of the sources)
#
# Sourced (`source bench/gpu.sh`), it only defines its functions.
seconds_left() {
  if [ "$BUDGET_S" -gt 0 ]; then echo $((BUDGET_S - ($(date +%s) - started))); else echo 100000; fi
}

summarize() {  # the run summary beside the results, rewritten after every step
  $PYTHON -m fastvlp.bench.run_summary "$RESULTS_DIR" "$STEPS" "$RUN_ID" \
    || echo "could not write $RESULTS_DIR/gpu_run.json"
}

pack() {  # everything measured so far, in one file (the device machine returns few files)
  summarize
  if [ -n "$OUT" ]; then tar czf "$OUT/gpu.tar.gz.tmp" "$RESULTS_ROOT" && mv "$OUT/gpu.tar.gz.tmp" "$OUT/gpu.tar.gz"; fi
}

record() {  # record NAME STATUS SECONDS DETAIL
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ')" >>"$STEPS"
  case $2 in failed|"timed out") failures+=("$1($2)") ;; esac
}

last_status=skipped
step() {  # step NAME CAP_S COMMAND...: run under min(CAP_S, time left), log, record the outcome, keep going
  local name=$1 cap=$2; shift 2
  last_status=skipped
  if [ -n "$ONLY" ] && [[ " gpu-check build $ONLY " != *" $name "* ]]; then
    echo "=== $name: not in ONLY"; record "$name" skipped 0 "not in ONLY"; return
  fi
  local left; left=$(seconds_left)
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 10 ]; then
    echo "=== $name: skipped, out of time"; record "$name" "timed out" 0 "not started: out of time"; pack; return
  fi
  echo "=== $name (at most ${cap}s)"
  local begin code detail; begin=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" >"$LOG_DIR/$name.log" 2>&1
  code=$?
  if [ $code -eq 0 ]; then
    last_status=ok; detail="log: logs/$name.log"; tail -n 25 "$LOG_DIR/$name.log"
  elif [ $code -eq 124 ] || [ $code -eq 137 ]; then
    last_status="timed out"; detail="cut at ${cap}s; what it wrote may be partial (log: logs/$name.log)"
    tail -n 60 "$LOG_DIR/$name.log"
  else
    last_status=failed; detail="exit $code (log: logs/$name.log)"; tail -n 60 "$LOG_DIR/$name.log"
  fi
  echo "--- $name: $last_status, took $(($(date +%s) - begin))s"
  record "$name" "$last_status" "$(($(date +%s) - begin))" "$detail"
  pack
}

gpu_pytest() {  # pytest that fails when no test passed: on a GPU machine, all-skipped means nothing ran
  local log; log=$(mktemp)
  "$PYTHON" -m pytest "$@" 2>&1 | tee "$log"
  local code=${PIPESTATUS[0]}
  if [ "$code" -eq 0 ] && ! grep -Eq "[0-9]+ passed" "$log"; then
    echo "FAILED: no test passed (every test was skipped or none was collected)"; code=1
  fi
  rm -f "$log"; return "$code"
}

train_step() {  # the paper's 6-r50 model on 800x1333-class images: batch 32, or the largest both backends fit
  local batch
  for batch in 32 16 8 4; do
    if $PYTHON -m fastvlp.bench.train_step --preset e2e-vlp-6-r50 --image-size 800x1216 --batch-size $batch \
         --amp --repeats 20 --profile-steps 3 --torchvision-backbone --cuda-graph --out-dir "$RESULTS_ROOT" >"$LOG_DIR/train-step-b$batch.log" 2>&1; then
      tail -n 40 "$LOG_DIR/train-step-b$batch.log"; return 0
    fi
    grep -q "OutOfMemoryError" "$LOG_DIR/train-step-b$batch.log" || { tail -n 40 "$LOG_DIR/train-step-b$batch.log"; return 1; }
    echo "batch $batch does not fit: trying a smaller one"
  done
  return 1
}

attention_at_ref() (  # the fused attention of $ATTENTION_REF_COMMIT and of this tree, E and X scenarios, one machine
  # A subshell: its EXIT trap removes the old tree's copy however the function ends.
  local ref=$ATTENTION_REF_COMMIT tree out; tree=$(mktemp -d)
  trap 'rm -rf "$tree"' EXIT
  case $RESULTS_DIR in /*) out=$RESULTS_DIR ;; *) out=$(pwd)/$RESULTS_DIR ;; esac
  git archive "$ref" fastvlp | tar -x -C "$tree" || { echo "cannot read fastvlp/ at $ref"; return 1; }
  # The old package runs from its own folder (its Triton kernels need no build) with its own benchmark code;
  # that folder has no .git, so its files are told their commit.
  (cd "$tree" && PYTHONPATH="$tree" FASTVLP_BENCH_GIT_COMMIT=$ref "$PYTHON" -m fastvlp bench attention --scenarios E X \
     --contenders fastvlp sdpa-cudnn --out-dir "$out/attention-at-${ref:0:9}") || return 1
  # A commit from before result files recorded their provenance writes none: name this run and that commit
  # in its files, so that the run summary does not list them as an earlier run's (it finished: complete).
  "$PYTHON" -c 'import json, pathlib, sys
for path in pathlib.Path(sys.argv[1]).rglob("*.json"):
    payload = json.loads(path.read_text())
    if isinstance(payload, dict) and not payload.get("provenance"):
        payload["provenance"] = {"run_id": sys.argv[2], "git_commit": sys.argv[3] + " (stated by bench/gpu.sh)"}
        payload.setdefault("complete", True)
        path.write_text(json.dumps(payload, indent=1) + "\n")' \
    "$out/attention-at-${ref:0:9}" "${FASTVLP_BENCH_RUN_ID:-}" "$ref" || return 1
  "$PYTHON" -m fastvlp bench attention --scenarios E X --contenders fastvlp sdpa-cudnn \
    --out-dir "$out/attention-at-head"
)

stop() {  # stop MESSAGE: a precondition failed, so nothing after it would measure working code
  echo "STOPPED: $1"; pack; echo "FAILED: ${failures[*]:-}"; exit 1
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 0; fi  # sourced: the functions only

set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-}
BUDGET_S=${BUDGET_S:-0}
ONLY=${ONLY:-}
RESULTS_ROOT=${RESULTS_ROOT:-bench/results}
started=$(date +%s)
# A stated commit comes first, as in the result files: a copied tree can carry stale git metadata.
commit=${FASTVLP_BENCH_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)-${commit:0:9}
RUN_ID=${RUN_ID%-}
export FASTVLP_BENCH_RUN_ID=$RUN_ID FASTVLP_BENCH_GPU_TESTS="not run"

# The results folder: the benchmarks' own name for the GPU; what nvidia-smi calls it when torch sees none.
device=
if command -v nvidia-smi >/dev/null 2>&1; then
  device=$($PYTHON -c "from fastvlp.bench.common import device_name; print(device_name('cuda'))" 2>/dev/null)
  [ -n "$device" ] || device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 \
                               | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
fi
device=${device:-no-gpu}
RESULTS_DIR=$RESULTS_ROOT/$device
LOG_DIR=$RESULTS_DIR/logs
mkdir -p "$LOG_DIR"
STEPS=$LOG_DIR/steps.tsv
: >"$STEPS"
failures=()

nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | tee "$LOG_DIR/gpu.txt" || true
step gpu-check 60 $PYTHON -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.cuda.get_device_name(0))"
[ "$last_status" = ok ] || stop "no CUDA device visible to torch ($LOG_DIR/gpu-check.log)"
if [ -z "${FASTVLP_CUDA_ARCHS:-}" ]; then  # build for this card only: a third of the compile time
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
  [ -n "$cap" ] && export FASTVLP_CUDA_ARCHS=$cap
fi
step build 300 $PYTHON -m pip install --no-build-isolation --no-deps -e .
[ "$last_status" = ok ] || stop "the build failed ($LOG_DIR/build.log): no benchmark would time the built code"
$PYTHON -c "import fastvlp, torch, triton; print(fastvlp.build_info()); print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$LOG_DIR/gpu.txt"
# Compiling and tuning the Triton kernels' variants is most of the tests' time: spread it over the cores.
parallel=$($PYTHON -c "import xdist" 2>/dev/null && echo "-n 8")
export PYTHON LOG_DIR RESULTS_ROOT RESULTS_DIR ATTENTION_REF_COMMIT=${ATTENTION_REF_COMMIT:-}
export -f train_step gpu_pytest attention_at_ref
# The logs name the tile that autotuning picked for each kernel and key.
export TRITON_PRINT_AUTOTUNING=1
step cuda-tests "${CUDA_TESTS_CAP_S:-300}" bash -c "gpu_pytest -q -m cuda -p no:cacheprovider $parallel tests"
case $last_status in
  ok) FASTVLP_BENCH_GPU_TESTS=passed ;;
  skipped) FASTVLP_BENCH_GPU_TESTS="not run" ;;
  *) FASTVLP_BENCH_GPU_TESTS="$last_status (see logs/cuda-tests.log)"
     echo "WARNING: the CUDA tests $last_status; every result file of this run records it" ;;
esac
export FASTVLP_BENCH_GPU_TESTS
# The quick steps that give the issues' figures come first (training step, solver, generation), then the
# long ones (attention scenarios, FlexAttention included; with ATTENTION_REF_COMMIT, an older commit's
# attention beside today's; every tile of each kernel; the end-to-end query time; the host-time diagnosis), so that a short lease still measures what matters most. The attention and end-to-end benchmarks
# rewrite their files after every scenario or row, so a step cut at its cap keeps what it timed.
step bench-train-step 300 bash -c train_step
# fastvlp pretrain itself, eager and --cuda-graph, on the same synthetic data (each run's logged step times).
step bench-pretrain-graph 300 $PYTHON -m fastvlp.bench.pretrain_graph --preset e2e-vlp-6-r50 --num-images 320 \
  --steps 30 --batch-size 32 --num-workers 12 --out-dir "$RESULTS_ROOT"
step bench-lsap 150 $PYTHON -m fastvlp bench lsap --device cuda --out-dir "$RESULTS_ROOT"
step bench-generation 200 $PYTHON -m fastvlp bench generation --preset e2e-vlp-6-r50 --device cuda --batch-size 16 \
  --max-length 20 --repeats 6 --out-dir "$RESULTS_ROOT"
step bench-attention 540 $PYTHON -m fastvlp bench attention --out-dir "$RESULTS_ROOT"
if [ -n "$ATTENTION_REF_COMMIT" ]; then
  step bench-attention-ref 300 bash -c attention_at_ref
fi
step bench-attention-tiles 360 $PYTHON -m fastvlp.bench.attention_tiles --out-dir "$RESULTS_ROOT"
# Hardware counters of the encoder-shape forward, fastvlp's kernel beside FlexAttention's and cuDNN's (the
# report is the step's log). Clocks stay as they are (METHOD.md); without ncu the step is recorded skipped.
if command -v ncu >/dev/null 2>&1; then
  step profile-attention 150 ncu --profile-from-start off --clock-control none --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
    $PYTHON -m fastvlp.bench.attention_kernel_profile --calls 1
else
  echo "=== profile-attention: skipped (ncu not found on PATH)"
  record profile-attention skipped 0 "ncu not found on PATH"
fi
step bench-e2e 400 $PYTHON -m fastvlp bench e2e --device cuda --image-sizes 448x448,448x746,600x1000,800x1333 \
  --batch-size 1 --repeats 20 --amp ${E2E_COMPILE:+--compile} --out "$RESULTS_DIR/e2e.json"
step bench-attention-overhead 150 $PYTHON -m fastvlp.bench.attention_overhead --out-dir "$RESULTS_ROOT"
if [ -n "${SKIP_SANITIZER:-}" ]; then
  echo "=== sanitizer: skipped (SKIP_SANITIZER is set)"
  record sanitizer skipped 0 "SKIP_SANITIZER is set"
elif ! command -v compute-sanitizer >/dev/null 2>&1; then
  echo "=== sanitizer: skipped (compute-sanitizer not found on PATH)"
  record sanitizer skipped 0 "compute-sanitizer not found on PATH"
else
  step sanitizer-memcheck 150 compute-sanitizer --tool memcheck --target-processes all --error-exitcode 1 \
    bash -c "gpu_pytest -q -x -p no:cacheprovider tests/test_lsap_cuda.py"
  step sanitizer-racecheck 150 compute-sanitizer --tool racecheck --target-processes all --error-exitcode 1 \
    bash -c "gpu_pytest -q -x -p no:cacheprovider -k 'small or ragged' tests/test_lsap_cuda.py"
fi

echo "results: $RESULTS_DIR/ (summary: $RESULTS_DIR/gpu_run.md, logs: $LOG_DIR/)"
pack
if [ ${#failures[@]} -gt 0 ]; then echo "FAILED: ${failures[*]}"; exit 1; fi
