#!/usr/bin/env bash
# Fills ./.whl (ignored by git) with what a bare GPU machine lacks for benchmarks/gpu_session.sh.
# That machine has python 3.12, torch, transformers, peft, pyarrow, pandas, huggingface_hub and no
# package index: everything else travels as wheels in .whl.
#
#   .whl/*.whl                torchft's own dependencies: torchao, omegaconf, datasets (+ dill,
#                             multiprocess), and setuptools for the editable install of torchft
#   .whl/peers/*.whl          the peers: torchtune 0.6.1 with the torchao it imports with (0.14.1) and
#                             torchdata; kept apart, since two torchao versions cannot share one folder
#   .whl/peers/bench_peers.py the shared peer harness, copied in so that it travels with the repo
#
# Usage (repository root, a machine with pip and a package index): bash benchmarks/gpu_wheels.sh
# lm-eval and wandb are left out: the GPU-marked tests do not use them (their tests skip without them).
# omegaconf 2.4 vendors its parser, so antlr4-python3-runtime is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
rm -rf "$dest"
mkdir -p "$dest/peers"

# python 3.12 on x86-64 Linux: pip matches each manylinux tag exactly, so name the usual ones
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {
    local into=$1
    shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$into" "$@"
}

download "$dest" torchao==0.18.0 omegaconf==2.4.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    setuptools==84.2.1
download "$dest/peers" torchtune==0.6.1 torchao==0.14.1 torchdata==0.11.0

harness=""
for dir in "${PEER_HARNESS_DIR:-}" shared/bench ../shared/bench ../../shared/bench; do
    if [ -n "$dir" ] && [ -f "$dir/bench_peers.py" ]; then harness=$dir/bench_peers.py; break; fi
done
if [ -n "$harness" ]; then
    cp "$harness" "$dest/peers/bench_peers.py"
else
    echo "peer harness not found (set PEER_HARNESS_DIR): the suite will list the peers as not measured" >&2
fi

ls -l "$dest" "$dest/peers"
du -sh "$dest"
