#!/usr/bin/env bash
# Every speed number of the benchmark on one GPU, in one call, for sessions lent a device
# machine for a few minutes. Nothing to prepare: the end-to-end stage reads the Time Machine
# that ships in the package (deeprnn/data/texts/), which travels with the working tree.
#     device run: command="bash launch/gpu_bench.sh", timeout_s=600
# All stages took about 7 minutes on an H200 before the cudnn rows, the profiles, the seeds
# and the default-precision stage were added (not timed on a GPU since). Name stages to run a
# part, most important first, e.g. `bash launch/gpu_bench.sh big_bf16 big_fp32 seeds`.
# The lent machines have jax, flax, optax, orbax and torch but not tensorflow-datasets or
# tensorboardX; nothing here needs them. Rows go to $OUT (or ./bench_out) as JSON, profiles
# (traces and top-ops tables, also in the JSON) under $OUT/profile_<stage>, tables to the log.
# A stage that fails is reported and the next one still runs.
set -uo pipefail
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
wanted=" $* "   # the stages named on the command line; none named: all
selected() { [[ "$wanted" == "  " || "$wanted" == *" $1 "* ]]; }
stage() {  # stage NAME ARGS...: one deeprnn.bench run, timed, its JSON in $out/NAME.json
    local name=$1; shift
    selected "$name" || return 0
    echo "=== $name: python -m deeprnn.bench $*"
    local start=$SECONDS
    python -m deeprnn.bench "$@" --json="$out/$name.json" || echo "=== $name failed"
    echo "=== $name took $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
git rev-parse HEAD 2>/dev/null || true
# The big config, where the library a user would pick instead wins: the profile says where the
# step goes; cudnn is cuDNN's LSTM through jax.experimental.rnn (float32 only).
stage big_bf16 --configs=big --dtype=bfloat16 --impls=fused,torch-d2l-loop,torch-tight \
    --repeats=3 --steps=10 --profile="$out/profile_big_bf16"
stage big_fp32 --configs=big --impls=fused,cudnn,torch-d2l-loop,torch-tight --repeats=3 \
    --steps=10 --profile="$out/profile_big_fp32"
# What a user gets: each library's default precision (TF32 in XLA:GPU and in PyTorch's cuDNN).
stage big_default --configs=big --precision=default --impls=fused,cudnn,torch-tight \
    --repeats=3 --steps=10
# layerwise:7 divides T = 35 (no steps left over after the loop, as the CPU's default does now);
# the GPU's default is 8, which leaves 3.
stage d2l --configs=d2l --profile="$out/profile_d2l" \
    --fused_variants=layerwise:8:generic,wavefront:2,layerwise:8:graph,layerwise:1:graph,layerwise:7
# Aggregate tokens/s of 1, 4 and 16 vmapped seeds at the d2l shape, and 4 and 16 separate runs.
stage seeds --configs=seeds
# fused against cudnn between the d2l and big shapes: rows for lstm_kernels.MEASURED.
stage mid --configs=mid --impls=fused,cudnn,torch-tight --repeats=3
stage depth --configs=depth --impls=fused,cudnn,torch-tight
book=deeprnn/data/texts/time_machine.txt
if [[ -f $book ]]; then
    stage e2e --e2e=$book
elif selected e2e; then
    echo "=== e2e skipped: no $book (run this from the repository root)"
fi
