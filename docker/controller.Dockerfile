# syntax=docker/dockerfile:1
# The controller image: HTTP + gRPC APIs, scheduler, autoscaler. The base install only, no torch.
#
#   docker build -f docker/controller.Dockerfile -t REGISTRY/ember-controller:0.1.0 .
#
# Build from the repository root (the context must hold pyproject.toml and the package folders).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
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
RUN /opt/venv/bin/pip install .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ember-controller" \
      org.opencontainers.image.description="Ember controller: serverless LLM inference APIs, scheduler and autoscaler" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed UID so the Helm chart's runAsUser matches; no login shell, no home directory writes
# needed (the chart mounts a read-only root filesystem with an emptyDir on /tmp).
RUN groupadd --system --gid 10001 ember \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ember --create-home --shell /usr/sbin/nologin ember
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/ember
EXPOSE 8080 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["ember"]
# Standalone default (one container, state in SQLite under the ember user's home). The Helm
# chart replaces these arguments: Redis state, admin key file, deployments file, --kubernetes.
CMD ["controller", "--host", "0.0.0.0", "--port", "8080", "--grpc-port", "50051", "--state", "sqlite:////var/lib/ember/controller.db"]
