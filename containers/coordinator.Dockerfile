# The coordinator: FastAPI on uvicorn, SQLite in /data by default (PostgreSQL with RMA_DATABASE_URL).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RMA_DATA_DIR=/data RMA_HOST=0.0.0.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir '.[postgres,redis]' && useradd -r -u 10001 -d /data rma \
    && mkdir -p /data && chown rma /data
USER rma
VOLUME /data
EXPOSE 8420
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8420/healthz', timeout=2)"
# Listening beyond loopback is asked for explicitly here: in a container that is the point.
CMD ["rma", "coordinator", "serve", "--host", "0.0.0.0", "--port", "8420"]
