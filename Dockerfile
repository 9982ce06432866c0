# infergate container image: `infergate serve` over a model repository mounted at /models.
#
#   docker build -t infergate:0.1.0 .                                  # CPU (onnxruntime)
#   docker build -t infergate:0.1.0-cuda --build-arg VARIANT=cuda .   # GPU: onnxruntime-gpu with CUDA 13 and
#       cuDNN 9 as pip wheels, so the host needs only the NVIDIA driver (R580 or newer; docs/deploy.md)
#   docker run --rm -p 8001:8001 -v "$PWD/demo-models:/models:ro" --read-only --tmpfs /tmp --stop-timeout 40 \
#       infergate:0.1.0                    # --read-only needs a writable /tmp: the server's temporary files
#   docker run --rm --gpus all --entrypoint /opt/infergate/check/scripts/gpu_check.sh infergate:0.1.0-cuda \
#       --out /tmp/gpu-check                                             # the GPU check (docs/gpu.md)
#
# Dependencies come from the exact pins in requirements/ (scripts/lock_requirements.py
# writes them). The image runs as a non-root user and writes nothing outside /tmp,
# so it works with a read-only root filesystem. scripts/build_image.sh builds it with
# buildah where no registry can be reached (BASE_IMAGE pointed at a local Debian).
#
# No HEALTHCHECK: Kubernetes ignores it and probes grpc.health.v1 natively (see
# helm/infergate), and a Docker health check would need a gRPC client in the image.

# VARIANT picks the pins (requirements/runtime-$VARIANT.txt); BASE_IMAGE the base to match.
ARG VARIANT=cpu
ARG BASE_IMAGE=python:3.11-slim-bookworm

# A Python 3.11 on any Debian-family base: python:* images have one; plain Debian
# bookworm and Ubuntu 22.04 get it from their own archives. Both variants use the same
# base: the CUDA variant brings its CUDA libraries itself (requirements/runtime-cuda.txt).
FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive
# The distribution's archive decides the patch release; pinning it would break every point update.
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM python AS builder
ARG VARIANT
WORKDIR /src
RUN python3.11 -m venv /opt/infergate
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret (never a layer):
#   --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements/ requirements/
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/infergate/bin/pip install -r "requirements/runtime-${VARIANT}.txt"
COPY pyproject.toml README.md LICENSE ./
COPY server/ server/
COPY clients/python/ clients/python/
# The GPU check (scripts/gpu_check.sh, docs/gpu.md) runs inside the image: the script, the load
# harness it drives and the client SDK the harness uses. A few hundred KiB; the same in both variants.
COPY scripts/gpu_check.sh /opt/infergate/check/scripts/
COPY load_tests/*.py /opt/infergate/check/load_tests/
COPY load_tests/gpu/ /opt/infergate/check/load_tests/gpu/
COPY load_tests/peers/ /opt/infergate/check/load_tests/peers/
# --no-deps: everything they need is already installed from the pins above.
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/infergate/bin/pip install --no-deps . ./clients/python \
    && /opt/infergate/bin/python -m compileall -q /opt/infergate/lib /opt/infergate/check

FROM python AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG VARIANT
LABEL org.opencontainers.image.title="infergate" \
      org.opencontainers.image.description="gRPC inference server for ONNX models (Open Inference Protocol / KServe V2), ${VARIANT} build" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/infergate/infergate"
RUN groupadd --gid 10001 infergate \
    && useradd --uid 10001 --gid infergate --no-create-home --home-dir /tmp --shell /usr/sbin/nologin infergate \
    && mkdir /models
COPY --from=builder /opt/infergate /opt/infergate
# Read-only root filesystem: no .pyc writes (compiled at build time), HOME in /tmp.
ENV PATH=/opt/infergate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
WORKDIR /tmp
VOLUME ["/models"]
EXPOSE 8001
# SIGTERM starts the drain: health NOT_SERVING, stop accepting, finish in-flight work
# within shutdown_grace_seconds (30 by default), exit 0. Give the container longer than
# that before SIGKILL: `docker run --stop-timeout 40`, or terminationGracePeriodSeconds
# in Kubernetes (the Helm chart derives it from the drain).
STOPSIGNAL SIGTERM
ENTRYPOINT ["infergate", "serve"]
CMD ["--model-repository", "/models", "--host", "0.0.0.0", "--port", "8001"]

FROM runtime AS runtime-cpu

# The CUDA 13 and cuDNN 9 libraries onnxruntime-gpu loads come from NVIDIA's pip wheels, pinned
# with it: nvidia/cu13/lib and nvidia/cudnn/lib in the venv. The driver (libcuda.so.1) is the
# host's: the NVIDIA container toolkit mounts it, into the library path or, on some Kubernetes
# nodes, under /usr/local/nvidia. NVIDIA_DRIVER_CAPABILITIES asks the toolkit for the compute part.
FROM runtime AS runtime-cuda
ENV LD_LIBRARY_PATH=/opt/infergate/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/infergate/lib/python3.11/site-packages/nvidia/cudnn/lib:/usr/local/nvidia/lib64:/usr/local/nvidia/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The image: the variant's runtime stage (VARIANT, above).
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
