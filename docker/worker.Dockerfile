# syntax=docker/dockerfile:1
# The worker image: tiered checkpoint cache, loader and inference on one GPU node.
#
#   docker build -f docker/worker.Dockerfile -t REGISTRY/ember-worker:0.1.0 .
#
# Build from the repository root. CUDA: torch wheels carry their own CUDA libraries; the host
# needs only an NVIDIA driver new enough for them. PyPI's Linux torch wheels are CUDA builds;
# to pick a specific CUDA build, point TORCH_INDEX_URL at PyTorch's index for it, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# and keep CUDA_IMAGE on the same CUDA major version.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api/ api/
COPY ckpt_format/ ckpt_format/
COPY cli/ cli/
COPY controller/ controller/
COPY loader/ loader/
COPY migration/ migration/
COPY sim/ sim/
COPY worker/ worker/
# torch from PyTorch's CUDA index first, everything else (and torch, if missing there) from PyPI.
RUN /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" '.[worker]'

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="ember-worker" \
      org.opencontainers.image.description="Ember worker: checkpoint cache tiers, fast loader and LLM inference on a GPU node" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# The same Python as the build stage (the venv links to it); coreutils' chown serves the
# chart's cache-permissions init container.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
# A fixed UID so the Helm chart's runAsUser matches.
RUN groupadd --system --gid 10001 ember \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/ember --create-home --shell /usr/sbin/nologin ember \
 && install -d -o 10001 -g 10001 /var/cache/ember
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/ember
EXPOSE 50052 9400
ENTRYPOINT ["ember"]
# Standalone default (e.g. docker compose with a service named "controller"). The Helm chart
# replaces these arguments with the node's name, pod IP and cache sizes.
CMD ["worker", "--controller", "controller:50051", "--host", "0.0.0.0", "--port", "50052", "--cache-dir", "/var/cache/ember", "--device", "cuda", "--metrics-port", "9400"]
