# fedmm site side (CPU): the SuperNode (`fedmm site`), which runs the ClientApp next to the
# site's data. Build from the repository root:
#   docker build -f docker/site.Dockerfile -t fedmm-site .
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

# The site's manifest and images under /data (read-only), ca.crt and the site key as secrets.
ENTRYPOINT ["fedmm"]
CMD ["site", "--help"]
