# The fedtune operator image: kopf, the Kubernetes client and the job spec schema; no torch.
#   docker build -t fedtune/operator:0.1.0 .
# Runs as `fedtune-operator` (see charts/fedtune-operator for its arguments).
# BASE_IMAGE: any Debian-like image with Python 3.11 and venv (make images passes a local
# stand-in where no registry is reachable).

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="fedtune-operator" \
      org.opencontainers.image.description="Runs FederatedFineTune resources as Redis, scheduler and party pods" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The user the chart runs it as (10001): kopf asks for the user's name (getpass), which
# needs a passwd entry.
RUN groupadd --gid 10001 fedtune \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin fedtune
# Dependencies first, pinned by constraints.txt: this layer is rebuilt only when they
# change, and a change to the project's code rebuilds the last two layers.
WORKDIR /tmp/fedtune-src
COPY pyproject.toml constraints.txt ./
RUN python -m venv /opt/venv \
    && mkdir -p trainer_image operator && touch README.md \
    && pip install -c constraints.txt "setuptools>=69" "./[operator]" \
    && pip uninstall -y fedtune \
    && rm -rf /tmp/fedtune-src

COPY README.md pyproject.toml /tmp/fedtune-src/
COPY trainer_image/fedtune /tmp/fedtune-src/trainer_image/fedtune
COPY operator/fedtune_operator /tmp/fedtune-src/operator/fedtune_operator
RUN pip install --no-deps --no-build-isolation /tmp/fedtune-src && rm -rf /tmp/fedtune-src

WORKDIR /
ENV HOME=/tmp
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["fedtune-operator"]
