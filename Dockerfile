# The fedtune operator image: kopf, the Kubernetes client and the job spec schema; no torch.
#   docker build -t fedtune/operator:0.1.0 .
# Runs as `fedtune-operator` (see charts/fedtune-operator for its arguments).

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer_image/fedtune ./trainer_image/fedtune
COPY operator/fedtune_operator ./operator/fedtune_operator
# A virtual environment copies cleanly into the runtime stage, without the build's leftovers.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "./[operator]"

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="fedtune-operator" \
      org.opencontainers.image.description="Runs FederatedFineTune resources as Redis, scheduler and party pods" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Any non-root user works (the chart runs it read-only as 10001); no passwd entry is needed.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["fedtune-operator"]
