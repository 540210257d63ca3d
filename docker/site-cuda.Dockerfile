# fedmm site side on an NVIDIA GPU: the same SuperNode + ClientApp as site.Dockerfile on a CUDA
# base; the ClientApp trains with bf16 autocast when `--device cuda` (or auto) finds the GPU.
# PyPI's torch 2.14.1 brings its own CUDA 13 and cuDNN libraries; the base adds the driver
# requirement (NVIDIA_REQUIRE_CUDA) the NVIDIA container toolkit checks. Run with the toolkit
# (`--gpus all`, or the reservation in compose.gpu.yml). From the repository root:
#   PYTHON=python3.12 docker/wheelhouse.sh      # Ubuntu 24.04's Python: wheelhouse/deps/cp312
#   docker build -f docker/site-cuda.Dockerfile -t fedmm-site-cuda .
# The base has no Python: it comes from the base's own package mirror (the build's one network
# use); a base that already has python3 + venv (`--build-arg BASE=...`) builds with --network none.
ARG BASE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN python3 -m venv --help >/dev/null 2>&1 || { apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*; }
RUN --mount=type=bind,source=docker/wheelhouse/deps,target=/wheelhouse \
    python3 -m venv /opt/venv \
    && tag=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")') \
    && { [ -f /wheelhouse/$tag/requirements.txt ] \
         || { echo "docker/wheelhouse/deps has no $tag: run docker/wheelhouse.sh with that Python" >&2; exit 1; }; } \
    && pip install --no-cache-dir --no-index --find-links /wheelhouse/$tag \
       -r /wheelhouse/$tag/requirements.txt
RUN --mount=type=bind,source=docker/wheelhouse/fedmm,target=/wheelhouse \
    pip install --no-cache-dir --no-index --no-deps /wheelhouse/fedmm-*.whl && pip check
WORKDIR /work

ENTRYPOINT ["fedmm"]
CMD ["site", "--help"]
