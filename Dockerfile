# tensorgate's container image (README.md, "Container image"):
#
#   docker build -t REGISTRY/tensorgate:0.1.0 .
#   scripts/build-image      without Docker or a registry: buildah, a base from Debian packages
#                            (docs/image.md; tests/test_image.py builds and runs it)
#
# Two stages. "builder" installs the hash-pinned runtime lock (requirements-runtime.lock) into the
# venv /opt/venv, generates the protobuf modules (scripts/gen_protos.py, run by setup.py with
# grpcio-tools from the hash-pinned requirements-build.lock) into a wheel of the gateway and
# installs that wheel. The final stage is a clean python:3.11-slim with that venv only: no
# compiler, no grpcio-tools, no pip in the venv, no test tools.
#
# Run time, as in deploy/kubernetes/deployment.yaml: UID/GID 10001 (runAsUser/runAsGroup), a
# read-only root filesystem (everything is byte-compiled here, PYTHONDONTWRITEBYTECODE=1), /tmp
# the only writable path (HOME; an emptyDir in the pod), the config at
# /etc/tensorgate/config/gateway.yaml (the ConfigMap). The image ships no config.
#
# Base: Python 3.11.16 on Debian 13 (trixie), the image `python:3.11-slim` names (Docker's
# official-images library/python, August 2026). The tag pins Python's patch release and the
# Debian release; for a byte-identical base, pin its digest as well when building:
#   docker build --build-arg PYTHON_IMAGE=python:3.11.16-slim-trixie@sha256:<digest> ...
# (`docker buildx imagetools inspect python:3.11.16-slim-trixie` prints it). Both stages must use
# the same image: the venv's interpreter is the base image's `python` (/usr/local/bin/python3.11).
# Any other base works if it has Python 3.11 as `python` with the venv module (ensurepip),
# groupadd and useradd: without a registry, scripts/build-image builds one from Debian packages
# (Debian 12's python3.11 in /usr/bin) and passes it here (docs/image.md). Nothing below names
# the interpreter's or the standard library's location.
ARG PYTHON_IMAGE=python:3.11.16-slim-trixie

FROM ${PYTHON_IMAGE} AS builder
# Behind a TLS-intercepting proxy, pip needs that proxy's CA bundle: mount it for the build only
# and name it here (scripts/build-image does, from the host's PIP_CERT). Unset by default; as a
# build argument of this stage it never reaches the final image.
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1
WORKDIR /src
# Dependencies first: this layer changes only with the locks. --require-hashes: every file pip
# downloads must match a sha256 in the lock, and every dependency must be in the lock.
COPY requirements-build.lock requirements-runtime.lock ./
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-compile --require-hashes -r requirements-build.lock \
    && python -m venv --without-pip /opt/venv \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-compile \
        --require-hashes -r requirements-runtime.lock
# The gateway itself (.dockerignore lets in only what the build needs; generated modules never).
COPY pyproject.toml setup.py README.md ./
COPY scripts/gen_protos.py scripts/
COPY protos/ protos/
COPY adapters/ adapters/
COPY gateway/ gateway/
# setup.py's build_py generates the protobuf modules (grpcio-tools from /opt/build) into the
# wheel; the wheel goes in without dependencies (they are all in the lock, installed above).
# Bytecode is written now, with hash-based invalidation, so a read-only root filesystem costs no
# start-up time and no file's timestamp can make it stale.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-compile --no-deps \
        --no-index /tmp/dist/tensorgate-*.whl \
    && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv/lib \
    && /opt/venv/bin/tensorgate --version

FROM ${PYTHON_IMAGE}
# The base image ships the standard library without bytecode: compile it here (about 15 MB),
# or every start would compile ~200 modules from source (~0.5 s) on the read-only filesystem.
# Wherever the base keeps it (/usr/local/lib/python3.11 in python:3.11-slim, /usr/lib/python3.11
# in Debian's python3.11), hash-based, so no file's timestamp can make it stale; -f: also where
# the base has timestamp-based bytecode already (Debian's packages compile at install).
RUN python -m compileall -q -f -j 0 -x /site-packages/ --invalidation-mode unchecked-hash \
        "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
    && groupadd --system --gid 10001 tensorgate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /bin/false tensorgate
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
WORKDIR /tmp
# Open Inference Protocol gRPC (and grpc.health.v1), admin API, Prometheus /metrics: the ports of
# deploy/kubernetes/gateway.yaml. Listeners bind what the config says (127.0.0.1 by default):
# a config for a container binds 0.0.0.0.
EXPOSE 8001 8002 9464
ENTRYPOINT ["tensorgate"]
CMD ["serve", "--config", "/etc/tensorgate/config/gateway.yaml"]
