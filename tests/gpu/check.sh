#!/usr/bin/env bash
# GPU check (issue 13, item 4): real-width Qwen3-Next layers through the trainer's own set-up on one
# GPU, with and without flash-linear-attention, at 4k / 16k / 32k tokens. See tests/gpu/check.py.
#
#   tests/gpu/check.sh                 # on the H200; results in ${OUT:-runs/gpu-check}/gpu_check.json + .log
#   tests/gpu/check.sh --cpu           # the same plumbing at tiny widths on CPU (what make test runs)
#
# Arguments go to check.py. Environment:
#   OUT                where gpu_check.json and gpu_check.log go (default runs/gpu-check)
#   PYTHON             interpreter (default python3: the device image's, which holds torch)
#   GPU_CHECK_BUDGET   seconds for everything, wheel install included (default 400)
#   GPU_CHECK_WHEELS   folder of carried wheels (default .whl; "none" to install nothing). Every wheel
#                      but flash-linear-attention's goes on PYTHONPATH for all stages; fla's only for
#                      the fla mode (check.py --fla-path). tests/gpu/prepare.sh fills the folder.
set -uo pipefail
cd "$(dirname "$0")/../.."

out="${OUT:-runs/gpu-check}"
mkdir -p "$out"
log="$out/gpu_check.log"
py="${PYTHON:-python3}"
budget="${GPU_CHECK_BUDGET:-400}"
wheels="${GPU_CHECK_WHEELS:-.whl}"
site="${TMPDIR:-/tmp}/hyperdistill-gpu-check-site"
start=$(date +%s)

run() {
    echo "== hyperdistill GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${budget} s =="
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    local fla_args=()
    if [ "$wheels" != none ] && compgen -G "$wheels/*.whl" >/dev/null; then
        local base=() fla=() w
        for w in "$wheels"/*.whl; do
            case "$(basename "$w")" in
                fla_core-*|flash_linear_attention-*) fla+=("$w") ;;
                *) base+=("$w") ;;
            esac
        done
        rm -rf "$site" && mkdir -p "$site/base" "$site/fla"
        local pip=("$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
        if [ ${#base[@]} -gt 0 ]; then
            "${pip[@]}" --target "$site/base" "${base[@]}" || { echo "wheel install failed"; return 1; }
            export PYTHONPATH="$site/base${PYTHONPATH:+:$PYTHONPATH}"
        fi
        if [ ${#fla[@]} -gt 0 ]; then
            "${pip[@]}" --target "$site/fla" "${fla[@]}" || { echo "fla wheel install failed"; return 1; }
            fla_args=(--fla-path "$site/fla")
        fi
        echo "installed ${#base[@]} wheels for every stage and ${#fla[@]} for the fla mode in $(( $(date +%s) - start )) s"
    fi
    # The gRPC stubs are generated (git-ignored): take the carried copy when the checkout has none.
    if [ ! -f common/stubs/teacher_pb2.py ] && [ -f "$wheels/stubs/teacher_pb2.py" ]; then
        cp "$wheels"/stubs/teacher_pb2*.py common/stubs/
    fi
    "$py" -c 'import sys, torch, transformers, google.protobuf as pb, grpc
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"protobuf {pb.__version__}, grpcio {grpc.__version__}, cuda {torch.cuda.is_available()}")' || true
    "$py" tests/gpu/check.py --out "$out" --budget $(( budget - ($(date +%s) - start) )) "${fla_args[@]}" "$@"
}

run "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "log: $log; total $(( $(date +%s) - start )) s; exit $status"
exit "$status"
