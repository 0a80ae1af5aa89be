#!/usr/bin/env bash
# Start a Docker engine (when none answers) and build the local test image the agent's docker
# runtime tests use.  No registry can be reached in CI: the image is `docker import`ed from a
# busybox-static root filesystem and serves HTTP with `busybox httpd` on the port in $PORT.
#
# Usage: bash .ci/docker-setup.sh        (as root; idempotent)
# Env:   RMA_TEST_IMAGE (default rma-test/httpd:latest), DOCKERD_LOG (default /tmp/dockerd.log)
set -euo pipefail

IMAGE=${RMA_TEST_IMAGE:-rma-test/httpd:latest}
LOG=${DOCKERD_LOG:-/tmp/dockerd.log}
SOCK=/var/run/docker.sock

engine_up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if ! engine_up; then
  command -v dockerd >/dev/null || { echo "dockerd not found: apt-get install docker.io" >&2; exit 1; }
  if [ "$(id -u)" != 0 ]; then echo "dockerd must be started as root" >&2; exit 1; fi
  # No bridge, no iptables: containers use the host's network (the tests give each its own port).
  nohup dockerd --iptables=false --ip-masq=false --bridge=none >"$LOG" 2>&1 &
  echo "dockerd started (pid $!, log $LOG)"
  for _ in $(seq 60); do
    [ -S "$SOCK" ] && engine_up && break
    sleep 1
  done
  engine_up || { echo "dockerd did not answer within 60 s:" >&2; tail -n 30 "$LOG" >&2; exit 1; }
fi
echo "Docker engine $(docker version --format '{{.Server.Version}}') answers on $SOCK"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "test image $IMAGE already present"
  exit 0
fi

BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || { echo "busybox not found: apt-get install busybox-static" >&2; exit 1; }
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  echo "$BUSYBOX is dynamically linked; the test image needs busybox-static" >&2
  exit 1
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/www" "$root/tmp"
cp "$BUSYBOX" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
echo ok >"$root/www/index.html"
echo ok >"$root/www/health"
tar -C "$root" -c . | docker import \
  --change 'ENV PORT=8000' \
  --change 'WORKDIR /www' \
  --change 'CMD ["/bin/busybox", "sh", "-c", "exec /bin/busybox httpd -f -p ${PORT} -h /www"]' \
  - "$IMAGE" >/dev/null
echo "built test image $IMAGE"
