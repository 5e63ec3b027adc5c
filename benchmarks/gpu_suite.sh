#!/usr/bin/env bash
# Every GPU test and benchmark in ONE invocation, so a short GPU window yields a complete results set.
#
# Phases, in this order (each gets a share of the time left, so an early finish leaves more for the later
# ones; the e2e.py phases also get a deadline and write their JSON as they go, so one cut short keeps what
# it measured; kernels.py and caption_match.py write theirs at the end). Most important first,
# torch.compile's long compilation last:
#   1. kernels   benchmarks/kernels.py (Triton kernels vs SDPA / F.group_norm at the Karlo shapes)
#   2. e2e       benchmarks/e2e.py, karlo: fast, torch, diffusers (eager fp16), fast_eager at batch 1 first,
#                then 8, 4 (Karlo defaults 25/25/7 steps, guidance 4/8) + PSNR of every pair + an fp32 reference
#   3. tests     pytest -m gpu over tests/ (CUDA-graph capture, sampler-on-GPU, ...) + tests/test_kernels.py,
#                which runs the compiled Triton kernels when CUDA is present
#   4. dalle2    benchmarks/e2e.py, dalle2 (64->256->1024): fast and torch at batch 1
#   5. toy       benchmarks/caption_match.py: what the trained toy cascade draws, torch vs fast (fp16, CUDA
#                graphs), 240 prompts; the issue's bar is every backend within 2 points of torch
#   6. compile   benchmarks/e2e.py, karlo: diffusers + torch.compile(mode="max-autotune"), batch 1 then 8
#                (compilation itself can take minutes; the phase records how long the first call took)
# Time: the device window is 15 minutes of device time in all, the machine's start (minutes) included, and
# one command may run 10 minutes; so the whole command is planned for UNCLIP_SUITE_SECONDS (default 570 s,
# 9.5 minutes): setup, then the phases (nominal budgets 60+200+90+60+40+90 = 540 s, scaled to the time
# left; a phase is killed at its budget + 25 s grace, which is kept inside the plan), then 30 s reserved
# for the tables, plots and copies. The summary prints the plan against the limits (600 s per command,
# 660 s = 11 minutes of window) and what each phase used; --smoke checks that plan (exit 1 if it exceeds).
# Output: benchmarks/results/<date>-<device>-<commit>.json (+ .md, -stages.png, -speedup.png, -images.png,
# -kernels.json) and the log <stem>-suite.log; all of them are also copied to $OUT when it is set.
#
# Through the device tool (the device image has torch, triton, transformers, matplotlib but NOT diffusers):
#   1. On the session machine, right before the call (needs PyPI):
#          bash benchmarks/gpu_suite.sh --prepare
#      downloads the diffusers wheel into .whl/ (ignored by git) and records the commit in .whl/source.env
#      (the device's copy of the tree has no git history).
#   2. run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=600)
#      (optionally kind="nvidia-h100-x1"; the physical-floor numbers are for H100/H200)
#   3. The files come back under the reply's files_at: copy them into benchmarks/results/, put the .md
#      tables and the plots into benchmarks/README.md, and commit.
#   A phase cut short (the log's summary says so; torch.compile's max-autotune is the likely one) can get a
#   call of its own: copy the returned JSON into benchmarks/results/ first (untracked files travel with the
#   tree and the results file is extended, not replaced), then
#          run(command="bash benchmarks/gpu_suite.sh --only compile", carry=[".whl"], timeout_s=600)
#   Phases: kernels, e2e, tests, dalle2, toy, compile (comma-separated).
# CPU smoke test of the whole flow (tiny preset, torch + diffusers only, no GPU needed):
#       bash benchmarks/gpu_suite.sh --smoke
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
MODE=gpu
ONLY=""
if [ "${1:-}" = "--only" ]; then ONLY=",${2:?--only needs phase names, e.g. --only compile,kernels},"; shift 2; fi
case "${1:-}" in
  --prepare)
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "diffusers==${DIFFUSERS_VERSION:-0.42.1}" || exit 1
    commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    dirty=$([ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo 1 || echo 0)
    printf 'UNCLIP_GIT_COMMIT=%s\nUNCLIP_GIT_DIRTY=%s\n' "$commit" "$dirty" > .whl/source.env
    ls -la .whl; cat .whl/source.env
    exit 0 ;;
  --smoke) MODE=smoke ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_suite.sh [--only PHASE,...] [--prepare | --smoke]" >&2; exit 2 ;;
esac

START=$(date +%s)
GPU_TOTAL=570       # default command budget on the GPU (seconds)
COMMAND_LIMIT=600   # the device tool's limit for one command
WINDOW_LIMIT=660    # 11 of the window's 15 minutes: what is left after the machine's start, with a margin
TAIL_RESERVE=30     # tables, plots and copies after the last phase
GRACE=25            # a phase may run 15 s past its budget (SIGINT) + 10 s more (SIGKILL)
TOTAL=${UNCLIP_SUITE_SECONDS:-$GPU_TOTAL}
[ "$MODE" = smoke ] && TOTAL=${UNCLIP_SUITE_SECONDS:-400}
END=$((START + TOTAL - TAIL_RESERVE))  # the phases' end; the tail reserve follows
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # time and test the compiled kernels
WORK=${TMPDIR:-/tmp}/unclip-suite
mkdir -p "$WORK" benchmarks/results
PRELOG="$WORK/suite.log"
: > "$PRELOG"
exec > >(tee -a "$PRELOG") 2>&1

say() { echo "[suite $(( $(date +%s) - START ))s/${TOTAL}s] $*"; }

# ---- environment: wheels, the package, the commit
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" \
    && say "installed $(ls .whl/*.whl | xargs -n1 basename)"
fi
if [ -f .whl/source.env ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  set -a; . .whl/source.env; set +a
fi
if ! (cd / && "$PY" -c "import unclip.kernels" 2>/dev/null); then
  # Not installed: assemble the `unclip` package from the source layout (as CMakeLists.txt installs it).
  rm -rf "$WORK/pkg" && mkdir -p "$WORK/pkg"
  cp -r engine "$WORK/pkg/unclip" && cp -r kernels "$WORK/pkg/unclip/kernels" && cp -r export "$WORK/pkg/unclip/export"
  export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
(cd / && "$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("unclip", "triton", "diffusers", "transformers", "matplotlib"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')} from {mod.__file__}")
    except Exception as e:
        print(f"{m}: NOT importable ({type(e).__name__}: {e})")
EOF
)
command -v nvidia-smi >/dev/null \
  && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,temperature.gpu --format=csv

if [ "$MODE" = smoke ]; then
  DEVICE_ARGS=(--device cpu --dtype fp32 --preset tiny --steps 2 2 2 --runs 2 --min-runs 1)
else
  DEVICE_ARGS=(--device cuda --dtype fp16)
fi
RESULT=$("$PY" benchmarks/e2e.py --print-default-out "${DEVICE_ARGS[@]}" | tail -n1)
[ "$MODE" = smoke ] && mkdir -p "$WORK/results" && RESULT="$WORK/results/$(basename "${RESULT%.json}")-smoke.json"
STEM="${RESULT%.json}"
LOG="$STEM-suite.log"
say "results: $RESULT"

# ---- phases: name, nominal seconds (shares of the time left), in order of importance
NAMES=(kernels e2e tests dalle2 toy compile)
GPU_NOMINAL=(60 200 90 60 40 90)
NOMINAL=("${GPU_NOMINAL[@]}")
if [ "$MODE" = smoke ]; then NOMINAL=(0 200 60 0 0 0); fi
SETUP_S=$(( $(date +%s) - START ))
if [ -n "$ONLY" ]; then  # e.g. --only compile: a second device call for a phase the first one cut short
  for i in "${!NAMES[@]}"; do [[ "$ONLY" == *",${NAMES[$i]},"* ]] || NOMINAL[$i]=0; done
fi
STATUS=()

budget_for() {  # $1 = phase index -> seconds for this phase (its hard limit, + GRACE, ends by END)
  local i=$1 rest=0 j now left
  for ((j = i; j < ${#NOMINAL[@]}; j++)); do rest=$((rest + NOMINAL[j])); done
  now=$(date +%s); left=$((END - now - GRACE))
  if [ "$rest" -le 0 ] || [ "$left" -le 0 ]; then echo 0; return; fi
  echo $(( left * NOMINAL[i] / rest ))
}

phase() {  # $1 = index; the rest = command (may use $DEADLINE)
  local i=$1; shift
  local name=${NAMES[$i]} budget rc t0
  budget=$(budget_for "$i")
  if [ "${NOMINAL[$i]}" -eq 0 ]; then STATUS+=("$name: not run in this mode"); return; fi
  if [ "$budget" -lt 20 ]; then say "SKIP $name (only ${budget}s left)"; STATUS+=("$name: skipped, no time"); return; fi
  export DEADLINE=$(( $(date +%s) + budget ))
  say "BEGIN $name (budget ${budget}s)"
  t0=$(date +%s)
  # The Python phases stop themselves at DEADLINE; the hard limit adds a grace period for cleanup.
  timeout --signal=INT --kill-after=10 $((budget + 15)) "$@"
  rc=$?
  say "END $name: exit $rc after $(( $(date +%s) - t0 ))s"
  STATUS+=("$name: exit $rc after $(( $(date +%s) - t0 ))s (budget ${budget}s)")
}

plan_check() {  # the GPU plan against the limits; prints it, returns 1 if it does not fit
  local sum=0 i parts="" fits=0 total=$GPU_TOTAL
  [ "$MODE" = gpu ] && total=$TOTAL  # UNCLIP_SUITE_SECONDS may override it; check what runs
  for i in "${!NAMES[@]}"; do sum=$((sum + GPU_NOMINAL[i])); parts+="${NAMES[$i]} ${GPU_NOMINAL[$i]} + "; done
  echo "  gpu plan: phases ${parts% + } = ${sum}s nominal (shares of the time left after setup; each phase's"
  echo "            hard limit of budget + ${GRACE}s ends inside the plan) + ${TAIL_RESERVE}s tail = command budget ${total}s"
  if [ $((sum + TAIL_RESERVE)) -gt "$total" ]; then
    echo "  gpu plan: FAILS: nominal phases + tail (${sum}s + ${TAIL_RESERVE}s) exceed the command budget ${total}s"; fits=1
  fi
  if [ "$total" -gt "$COMMAND_LIMIT" ] || [ "$total" -gt "$WINDOW_LIMIT" ]; then
    echo "  gpu plan: FAILS: ${total}s exceeds the per-command limit ${COMMAND_LIMIT}s or the window's ${WINDOW_LIMIT}s"; fits=1
  fi
  [ "$fits" -eq 0 ] && \
    echo "  gpu plan: fits: ${total}s <= ${COMMAND_LIMIT}s per command <= ${WINDOW_LIMIT}s (11 min of the 15-min window)"
  return $fits
}

say "plan:"; plan_check || true
# 1. kernels
phase 0 "$PY" benchmarks/kernels.py --iters 10 --out "$STEM-kernels.json"
# 2. e2e (karlo or, in smoke mode, tiny): our backends and diffusers eager; batch 1 of every system first
if [ "$MODE" = smoke ]; then
  phase 1 bash -c "'$PY' benchmarks/e2e.py ${DEVICE_ARGS[*]} --systems torch diffusers --batches 1 2 \
                   --reference-fp32 --out '$RESULT' --workdir '$WORK/e2e' --deadline \$DEADLINE"
else
  phase 1 bash -c "'$PY' benchmarks/e2e.py ${DEVICE_ARGS[*]} --preset karlo --systems fast torch diffusers fast_eager \
                   --batches 1 8 4 --reference-fp32 --out '$RESULT' --workdir '$WORK/e2e' --deadline \$DEADLINE"
fi
# 3. tests. Run from tests/: `python -m pytest` from the repo root would put the source folder kernels/ on
#    sys.path, shadowing the `kernels` package transformers probes for (README).
if [ "$MODE" = smoke ]; then
  phase 2 bash -c "cd tests && '$PY' -m pytest -q -x -m gpu -p no:cacheprovider test_graphs.py"
else
  # Both runs always happen; the phase fails if either does. A module that cannot be imported there must
  # not hide the others' GPU tests (--continue-on-collection-errors).
  phase 2 bash -c "cd tests && { '$PY' -m pytest -q -rs -m gpu -p no:cacheprovider --continue-on-collection-errors .; \
                   a=\$?; '$PY' -m pytest -q -rs -p no:cacheprovider test_kernels.py; b=\$?; exit \$((a | b)); }"
fi
# 4. the dalle2 cascade
phase 3 bash -c "'$PY' benchmarks/e2e.py ${DEVICE_ARGS[*]} --preset dalle2 --systems fast torch --batches 1 \
                 --runs 5 --out '$RESULT' --workdir '$WORK/e2e' --deadline \$DEADLINE"
# 5. the toy cascade's caption match, per backend
phase 4 "$PY" benchmarks/caption_match.py --device cuda --dtype fp16 --backend torch fast --no-extras \
        --json "$STEM-toy.json"
# 6. diffusers + torch.compile: the longest compilation, so last (a cut-short run can get its own call)
phase 5 bash -c "'$PY' benchmarks/e2e.py ${DEVICE_ARGS[*]} --preset karlo --systems diffusers_compile --batches 1 8 \
                 --out '$RESULT' --workdir '$WORK/e2e' --deadline \$DEADLINE"

# ---- tables and plots from everything measured, then copies for the device tool
PHASES_END=$(date +%s)
timeout --kill-after=5 $((TAIL_RESERVE - 10)) \
  "$PY" benchmarks/e2e.py --render-only "${DEVICE_ARGS[@]}" --out "$RESULT" --workdir "$WORK/e2e" || true
say "summary:"
for s in "${STATUS[@]}"; do echo "  $s"; done
echo "  this run: setup ${SETUP_S}s, phases $((PHASES_END - START - SETUP_S))s, render $(( $(date +%s) - PHASES_END ))s," \
     "command so far $(( $(date +%s) - START ))s of ${TOTAL}s"
PLAN_RC=0
plan_check || PLAN_RC=1
[ -f "$STEM.md" ] && cat "$STEM.md"
cp "$PRELOG" "$LOG"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  for f in "$RESULT" "$STEM.md" "$STEM-stages.png" "$STEM-speedup.png" "$STEM-images.png" "$STEM-kernels.json" \
           "$STEM-toy.json"; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  cp "$PRELOG" "$OUT/$(basename "$LOG")"
  say "copied to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
say "done"
# --smoke exists to check the flow and the plan: a plan that does not fit the window fails it.
[ "$MODE" = smoke ] && exit $PLAN_RC
exit 0
