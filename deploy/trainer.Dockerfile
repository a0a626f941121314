# The trainer on PyTorch's CUDA image: torch comes from the base and a constraint keeps it exactly
# (the trainer needs neither extra: `cpu` would pin a CPU torch, `gpu` is vLLM for the teacher).
# Build from the repository root (compose does): docker build -f deploy/trainer.Dockerfile .
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
ARG BUILD_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-devel

# The DeltaNet kernels: causal-conv1d is a CUDA extension published as source only, so it is
# built against the same torch with nvcc (Hopper only), and installed into the runtime image.
FROM ${BUILD_IMAGE} AS kernels
RUN TORCH_CUDA_ARCH_LIST="9.0" CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=8 \
    python -m pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels causal-conv1d==1.7.0

FROM ${BASE_IMAGE}

ARG APP_UID=10001
ENV PYTHONUNBUFFERED=1

WORKDIR /app
COPY --from=kernels /wheels /tmp/wheels
COPY . .
# flash-linear-attention: the chunked gated delta rule (Triton) for 36 of the 48 student layers;
# without it and causal-conv1d transformers runs PyTorch reference loops (trainer.model refuses).
# tilelang: fla's gated backward on Hopper with Triton < 3.7.1 (fla #640; trainer.model checks).
RUN python -c 'import torch; print(f"torch=={torch.__version__}")' > /tmp/base.txt \
 && python -m pip install --no-cache-dir -c /tmp/base.txt -e . grpcio-tools==1.85.1 \
      flash-linear-attention==0.6.0 fla-core==0.6.0 tilelang==0.1.15 /tmp/wheels/*.whl \
 && python -m grpc_tools.protoc -Icommon/stubs=protos/hyperdistill/teacher/v1 --python_out=. --pyi_out=. \
      --grpc_python_out=. protos/hyperdistill/teacher/v1/teacher.proto \
 && sed -i 's/^from common\.stubs import/from hyperdistill.common.stubs import/' common/stubs/teacher_pb2_grpc.py \
 && python -m pip uninstall -y grpcio-tools \
 && python -c 'import torch, hyperdistill.trainer.train; assert torch.version.cuda, "a CUDA build of torch is needed"'

# Non-root; compose mounts /cache (model cache), /data (tokenized data) and /checkpoints
# (checkpoints, run logs, offline wandb): chown the host directories to APP_UID.
RUN useradd --uid ${APP_UID} --user-group --create-home --shell /usr/sbin/nologin hyperdistill \
 && install -d -o hyperdistill -g hyperdistill /cache /data /checkpoints
# Model and compile caches on the mounted volume, so they outlive the container.
ENV HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton
USER hyperdistill

# No CMD: compose runs `torchrun --nproc_per_node N -m hyperdistill.trainer --config ...` with N from the layout
# (deploy/cluster.yaml), and /metrics on metrics.port + rank.
