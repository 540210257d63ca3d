# fedmm site side on an NVIDIA GPU: the same SuperNode + ClientApp with CUDA torch; the
# ClientApp trains with bf16 autocast when `--device cuda` (or auto) finds the GPU.
#   docker build -f docker/site-cuda.Dockerfile -t fedmm-site-cuda .
# Run with the NVIDIA container toolkit (`--gpus all`, or the reservation in compose.gpu.yml).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml README.md ./
COPY common common
COPY server server
COPY client client
COPY simulations simulations
RUN pip install --no-cache-dir -e .

ENTRYPOINT ["fedmm"]
CMD ["site", "--help"]
