# fedmm server side: the SuperLink (`fedmm server`), which runs the ServerApp in its own
# SuperExec, and the coordinator's `fedmm train`. Builds offline from the wheelhouse
# (docker/wheelhouse.sh), with BuildKit, from the repository root:
#   docker build --network none -f docker/server.Dockerfile -t fedmm-server .
#   docker build --network none --build-arg BASE=fedmm-base:bookworm ...   # no registry
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# The same layers as site.Dockerfile: built once, shared by both images.
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

# TLS files and the site public keys under /certs, the state database under /state,
# run folders (metrics, checkpoints, adapters) under /runs.
VOLUME ["/state", "/runs"]
EXPOSE 9093
ENTRYPOINT ["fedmm"]
CMD ["server", "--certs", "/certs", "--host", "0.0.0.0", "--port", "9093", "--state", "/state"]
