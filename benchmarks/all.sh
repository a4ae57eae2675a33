#!/usr/bin/env bash
# Every benchmark on one device, in one go: training throughput, top-9 mining overhead,
# projection and occlusion speed against Captum (captum must be importable for the last two).
#
#     bash benchmarks/all.sh [cpu|cuda] [OUT_DIR]       # or: make benchmarks DEVICE=cuda
#
# Writes OUT_DIR/{train_throughput,mine_overhead,projection_speed,occlusion_speed}_<device>.json
# (OUT_DIR defaults to results/benchmarks, where the report picks them up) and prints each
# table. On an H100-class GPU the whole run takes a few minutes, on the 2-core CPU about 10.
# Uses .venv/bin/python when it exists, else python3 (PYTHON=... overrides). A benchmark that
# fails or outlasts LIMIT seconds (default 600) is reported and the next one still runs; the
# exit status says whether all four finished.
set -u
device=${1:-cpu}
out=$(realpath -m "${2:-$(dirname "$0")/../results/benchmarks}")  # before the cd below
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
limit=${LIMIT:-600}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=()

run() {
    local name=$1
    shift
    echo "== $name ($device, $(date +%H:%M:%S))"
    timeout "$limit" "$python" "benchmarks/$name.py" --device "$device" --out "$out/${name}_$device.json" "$@"
    local status=$?
    if [ "$status" -ne 0 ]; then
        echo "!! $name failed (exit status $status)"
        failed+=("$name")
    fi
}

run train_throughput --models lenet alexnet zfnet resnet50 --batch-size 32
run mine_overhead
run projection_speed
run occlusion_speed
if [ ${#failed[@]} -gt 0 ]; then
    echo "benchmarks that did not finish: ${failed[*]}"
    exit 1
fi
echo "all benchmarks finished: $out/*_$device.json"
