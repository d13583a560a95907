#!/usr/bin/env bash
# Everything a GPU machine is lent for, in one command of under 8 minutes, every result under OUTDIR:
#   1. install the wheels carried in .whl (benchmarks/gpu_wheels.sh fills it) and torchft itself;
#   2. tune estimate's peak for each suite row, on one CPU core beside the GPU work (estimates.jsonl);
#   3. the GPU-marked tests (gpu_tests.log);
#   4. the benchmark suite within what is left of the time (suite_rows.jsonl and RESULTS.md, both
#      brought up to date after every row, with the estimates beside the measured peaks; suite.log).
# session.log says what ran, for how long, and the versions found; optimizer_step.log times the bf16
# optimizer step against fused AdamW. Eight files in all (what one command can bring back).
#
#   bash benchmarks/gpu_session.sh OUTDIR            # on the GPU machine (repository root)
#   bash benchmarks/gpu_session.sh OUTDIR --dry-run  # on a CPU: no installs, toy shapes, the same steps
#
# Every step runs under `timeout -k 10`: a training loop takes SIGTERM as "save and stop", so a step
# that does not end on SIGTERM is killed 10 s later.
# TORCHFT_COMMIT=<hash> names the commit in the results where the copy of the tree has no git.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUTDIR [--dry-run]}
dry_run=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
session_s=${SESSION_BUDGET_S:-450}  # 7 minutes: one command may take 10, a session's device time is 15
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$out/session.log"; }
left() { echo $((session_s - SECONDS)); }
: >"$out/session.log"

tiny=()
peer_args=()
if [ "$dry_run" = "--dry-run" ]; then
    tiny=(--tiny)
    log "dry run: toy shapes on the CPU, with the packages already installed"
else
    log "installing .whl/*.whl into /tmp/site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >>"$out/session.log" 2>&1 || log "wheel install FAILED"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # editable, so that `tune run` finds the recipes of this tree (setuptools comes from /tmp/site)
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$out/session.log" 2>&1 \
        || log "torchft install FAILED: recipe tests will fail"
    if compgen -G ".whl/peers/*.whl" >/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/peersite .whl/peers/*.whl >>"$out/session.log" 2>&1 || log "peer wheel install FAILED"
        peer_args=(--peer-pythonpath /tmp/peersite)
    fi
    if [ -f .whl/peers/bench_peers.py ]; then export PEER_HARNESS_DIR=$PWD/.whl/peers; fi
    nvidia-smi -L >>"$out/session.log" 2>&1
fi
"$python" - >>"$out/session.log" 2>&1 <<'EOF'
from importlib.metadata import PackageNotFoundError, version
import sys
found = []
for name in ("torch", "transformers", "peft", "torchao", "omegaconf", "datasets", "pyarrow", "fsspec", "torchft"):
    try:
        found.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        found.append(f"{name} missing")
print(f"python {sys.version.split()[0]};", ", ".join(found))
EOF

log "estimates in the background (one CPU core)"
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 timeout -k 10 150 "$python" benchmarks/bench_finetune.py --suite --estimates "${tiny[@]}" --out "$out" \
    ${SUITE_ARGS:-} >"$out/estimates.log" 2>&1 &
estimates_pid=$!

tests_s=$(( $(left) - 250 < 150 ? $(left) - 250 : 150 ))  # the suite keeps at least 230 s
tests_s=$(( tests_s < 30 ? 30 : tests_s ))
tests_s=${GPU_TESTS_S:-$tests_s}  # GPU_TESTS_S, OPTIMIZER_BENCH_S and SUITE_ARGS (e.g. "--no-peers lora_1b")
                                  # narrow a rerun that has less device time left
log "GPU-marked tests, at most ${tests_s} s"
per_test=()
if "$python" -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout 100); fi
timeout -k 10 "$tests_s" "$python" -m pytest -m gpu -v -rA --durations=0 -p no:cacheprovider "${per_test[@]}" tests \
    >"$out/gpu_tests.log" 2>&1
log "tests exited $? ($(tail -n 1 "$out/gpu_tests.log"))"

opt_s=${OPTIMIZER_BENCH_S:-75}
log "bf16 optimizer step against fused AdamW (1B shapes, 4 layers), at most ${opt_s} s"
timeout -k 10 "$opt_s" "$python" benchmarks/bench_bf16_optimizer_step.py --layers 4 "${tiny[@]}" >"$out/optimizer_step.log" 2>&1
log "optimizer step exited $?"

wait "$estimates_pid"
log "estimates exited $?"

suite_s=$(( $(left) - 20 ))
log "suite, budget ${suite_s} s"
# shellcheck disable=SC2086  # SUITE_ARGS is a list of words
timeout -k 10 $((suite_s + 15)) "$python" benchmarks/bench_finetune.py --suite "${tiny[@]}" --budget "$suite_s" \
    --out "$out" "${peer_args[@]}" ${SUITE_ARGS:-} >"$out/suite.log" 2>&1
log "suite exited $?"

cat "$out/RESULTS.md" 2>/dev/null
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$out/gpu_tests.log"
log "done"
