# fedmm site side: the SuperNode (`fedmm site`), which runs the ClientApp next to the site's
# data (on CPU; PyPI's torch carries CUDA too, site-cuda.Dockerfile adds the GPU base). Builds offline from the wheelhouse (docker/wheelhouse.sh), with BuildKit, from
# the repository root:
#   docker build --network none -f docker/site.Dockerfile -t fedmm-site .
#   docker build --network none --build-arg BASE=fedmm-base:bookworm ...   # no registry
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# Third-party wheels first (a layer that outlives code changes), then the fedmm wheel.
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

# The site's manifest and images under /data (read-only), ca.crt and the site key as secrets.
ENTRYPOINT ["fedmm"]
CMD ["site", "--help"]
