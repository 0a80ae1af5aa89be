# The worker agent in a container: runs services as sibling containers through the host's Docker
# socket (mount /var/run/docker.sock) or, with RMA_RUNTIME=process, as local processes.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RMA_DATA_DIR=/data
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir '.[docker,gpu]'
VOLUME /data
# RMA_COORDINATOR_URL and RMA_TOKEN come from the environment (see compose.yaml).
CMD ["rma", "worker", "join"]
