# syntax=docker/dockerfile:1
# fastgate container image.
#
#   docker build -t fastgate:0.1.0 .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/gateway.yaml:/etc/fastgate/gateway.yaml:ro" fastgate:0.1.0
#
# The image ships no configuration: mount yours at /etc/fastgate/gateway.yaml (Kubernetes:
# deploy/kubernetes/configmap.yaml) or pass another path: `docker run ... run -c /path`.
#
# Reproducible builds: every Python package comes from constraints.txt (exact versions, build
# tools included), and the base image should be pinned by digest. A tag such as 3.11-slim
# moves with every Debian and Python patch release; a digest never does. Look the digest up
# and pass it (or write it into the ARG default below and let Renovate/Dependabot bump it):
#   docker buildx imagetools inspect python:3.11-slim --format '{{json .Manifest.Digest}}'
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest> -t fastgate:0.1.0 .
# Both stages use the same image, so the extension is compiled against the Python it runs on.
ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: compile the Cython hot path and collect every wheel ------------------------------
FROM ${PYTHON_IMAGE} AS builder

# gcc + libc headers for the fastgate extensions (and any dependency without a
# prebuilt wheel); the Python headers come with the python image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# PIP_CONSTRAINT reaches the pip that fills each isolated build environment too (newer pip
# reads PIP_BUILD_CONSTRAINT for that): setuptools and Cython are pinned like the rest.
# LDFLAGS=-s: link the extension stripped. Python's default CFLAGS carry -g, so unstripped it
# ships its debug info (measured: 2.7 MB unstripped, 0.4 MB stripped); the runtime image has
# no debugger to use it.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/constraints.txt PIP_BUILD_CONSTRAINT=/src/constraints.txt \
    LDFLAGS=-s
WORKDIR /src

# Dependency wheels first, from pyproject.toml and the constraints alone, so this layer
# survives source edits.
COPY pyproject.toml constraints.txt ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && pip wheel -c constraints.txt -w /wheels -r /tmp/requirements.txt

# Then fastgate itself (builds and embeds fastgate/_verify*.so).
COPY setup.py README.md LICENSE ./
COPY fastgate ./fastgate
RUN pip wheel --no-deps -w /wheels .

# --- runtime: wheels only, no compiler, non-root ------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# OCI image annotations (https://github.com/opencontainers/image-spec, annotations.md).
# VERSION / REVISION / CREATED are build facts: pass them from CI, e.g.
#   --build-arg REVISION="$(git rev-parse HEAD)" --build-arg CREATED="$(date -u +%FT%TZ)"
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="fastgate" \
      org.opencontainers.image.description="JWT-validating edge reverse proxy with a compiled verifier hot path" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install from the builder's wheels only (--no-index: nothing else is downloaded here), and
# check that the compiled verifier imports: fastgate refuses to run without it.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels fastgate \
 && python -c 'import fastgate._verify, fastgate; print("fastgate", fastgate.__version__)'

# A fixed numeric uid/gid so Kubernetes `runAsNonRoot` can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 fastgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin fastgate \
 && mkdir -p /etc/fastgate

USER 10001
WORKDIR /tmp

# The admin port (`admin`: /metrics /healthz /readyz) the HEALTHCHECK below probes, and that
# EXPOSE documents. The health check reads FASTGATE_ADMIN_PORT when it runs, so it follows the
# configured port if the config takes its port from the same variable, which the loader
# substitutes (SPEC §2 `${NAME}`):
#   admin: "0.0.0.0:${FASTGATE_ADMIN_PORT}"        # in gateway.yaml
#   docker run -e FASTGATE_ADMIN_PORT=9902 ...      # moves the listener and the check together
# With a literal port in the config, set FASTGATE_ADMIN_PORT to it (or build with
# --build-arg ADMIN_PORT=...). `admin: null` has no health endpoint: run with --no-healthcheck.
ARG ADMIN_PORT=9901
ENV FASTGATE_ADMIN_PORT=${ADMIN_PORT}

# 8080: data plane (`listen`); ADMIN_PORT: admin. Publish only 8080 to clients.
EXPOSE 8080 ${ADMIN_PORT}

# The slim image has no curl: probe /healthz with the interpreter. The check runs inside the
# container, so it works with `admin: 127.0.0.1:PORT` as well as `0.0.0.0:PORT`. Kubernetes
# ignores HEALTHCHECK and uses the probes in deploy/kubernetes/deployment.yaml.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('FASTGATE_ADMIN_PORT') or '9901'; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["fastgate"]
CMD ["run", "-c", "/etc/fastgate/gateway.yaml"]
