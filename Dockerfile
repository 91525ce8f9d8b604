# LiveStage service image (CPU). One image, every service: the command picks it
# (`python -m services.<name>`). Build: docker build -t livestage:cpu .
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt pyproject.toml README.md ./
# CPU wheel of torch first, so requirements.txt's pin does not pull the CUDA build
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -r requirements.txt
COPY protos ./protos
COPY libs ./libs
COPY services ./services
RUN pip install --no-deps -e . && python -m livestage.protos
RUN useradd --uid 10001 --create-home livestage && chown -R livestage /app/libs/livestage/v1
USER 10001
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
