#!/usr/bin/env bash
# Every speed number of the benchmark on one GPU, in one call (about 7 minutes on an H200), for
# sessions lent a device machine for a few minutes. Prepare here, then run there:
#     mkdir -p .data && cp ../shared/corpora/time_machine.txt .data/     # .data is git-ignored
#     device run: command="bash launch/gpu_bench.sh", carry=[".data"], timeout_s=600
# The lent machines have jax, flax, optax, orbax and torch but not tensorflow-datasets or
# tensorboardX; nothing here needs them. Rows go to $OUT (or ./bench_out) as JSON, tables to the
# log. A stage that fails is reported and the next one still runs.
set -uo pipefail
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
stage() {  # stage NAME ARGS...: one deeprnn.bench run, timed, its JSON in $out/NAME.json
    local name=$1; shift
    echo "=== $name: python -m deeprnn.bench $*"
    local start=$SECONDS
    python -m deeprnn.bench "$@" --json="$out/$name.json" || echo "=== $name failed"
    echo "=== $name took $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
git rev-parse HEAD 2>/dev/null || true
stage d2l --configs=d2l \
    --fused_variants=layerwise:8:generic,wavefront:2,layerwise:8:graph,layerwise:1:graph
stage depth --configs=depth --impls=fused,torch-tight
stage big_fp32 --configs=big --impls=fused,torch-d2l-loop,torch-tight --repeats=3 --steps=10
stage big_bf16 --configs=big --dtype=bfloat16 --impls=fused,torch-d2l-loop,torch-tight \
    --repeats=3 --steps=10
if [[ -f .data/time_machine.txt ]]; then
    stage e2e --e2e=.data/time_machine.txt
else
    echo "=== e2e skipped: no .data/time_machine.txt (see the header of this script)"
fi
