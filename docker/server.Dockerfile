# fedmm server side: the SuperLink (`fedmm server`), which runs the ServerApp in its own
# SuperExec, and the coordinator's `fedmm train`. Build from the repository root:
#   docker build -f docker/server.Dockerfile -t fedmm-server .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml README.md ./
COPY common common
COPY server server
COPY client client
COPY simulations simulations
RUN pip install --no-cache-dir -e .

# TLS files and the site public keys under /certs, the state database under /state,
# run folders (metrics, checkpoints, adapters) under /runs.
VOLUME ["/state", "/runs"]
EXPOSE 9093
ENTRYPOINT ["fedmm"]
CMD ["server", "--certs", "/certs", "--host", "0.0.0.0", "--port", "9093", "--state", "/state"]
