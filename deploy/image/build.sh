#!/usr/bin/env bash
# Build the encloud server image with Debian's own tools (no registry image is pulled):
#
#   deploy/image/build.sh [--embeddings-model DIR] MODEL_DIR [TAG]
#                                              (from the repository root, after ./dev setup)
#
# With --embeddings-model the image also serves embeddings: the exported embedding model
# (encloud export-embeddings-model) at /opt/encloud/embeddings-model, the variable that names
# it, and its digest as a second label.
#
# 1. the server's Python packages, hash-locked (requirements/server.lock), and the encloud
#    wheel, installed into a staging folder (CPython 3.11 wheels, as Debian 12's python3.11);
# 2. a Debian 12 minbase rootfs by mmdebstrap with python3.11 and the TSS2 libraries, the
#    staging folder and the exported model copied in, a non-root user (uid 10001) (steps 1-2
#    are deploy/image/stage.sh, shared with the measured VM image, build-vm.sh);
# 3. imported into podman with the entrypoint, the environment, and the model digest as a
#    label. Run it read-only, as that user (docs/DEPLOY.md).
#
# Prints the image reference. Needs mmdebstrap and podman (./dev installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: deploy/image/build.sh [--embeddings-model DIR] MODEL_DIR [TAG]"
EMBEDDINGS_DIR=""
if [ "${1:-}" = "--embeddings-model" ]; then
  EMBEDDINGS_DIR="$(realpath "${2:?$USAGE}")"
  shift 2
fi
MODEL_DIR="$(realpath "${1:?$USAGE}")"
PY=.venv/bin/python
digest_of() {
  "$PY" -c 'import sys; from encloud.server.inference.manifest import verify_model_folder as v; print(v(sys.argv[1]).model_digest.hex())' "$1"
}
DIGEST="$(digest_of "$MODEL_DIR")"
TAG="${2:-localhost/encloud-server:${DIGEST:0:12}}"
EMBEDDINGS_CHANGES=()
if [ -n "$EMBEDDINGS_DIR" ]; then
  EMBEDDINGS_DIGEST="$(digest_of "$EMBEDDINGS_DIR")"
  EMBEDDINGS_CHANGES=(
    --change 'ENV ENCLOUD_EMBEDDINGS_MODEL_DIR=/opt/encloud/embeddings-model'
    --change "LABEL dev.encloud.embedding-model-digest=$EMBEDDINGS_DIGEST"
  )
fi
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/image/containers.conf}"
. deploy/image/stage.sh

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage_encloud "$work" "$MODEL_DIR"
echo "image: model $DIGEST" >&2
if [ -n "$EMBEDDINGS_DIR" ]; then
  cp -r "$EMBEDDINGS_DIR" "$work/encloud/embeddings-model"
  echo "image: embedding model $EMBEDDINGS_DIGEST" >&2
fi

echo "image: Debian 12 minbase rootfs (mmdebstrap)" >&2
mmdebstrap --quiet --variant=minbase --include="$ROOTFS_PACKAGES" "${ROOTFS_HOOKS[@]}" \
  --customize-hook='mkdir -p "$1/var/lib/encloud" && chown 10001:10001 "$1/var/lib/encloud"' \
  bookworm "$work/rootfs.tar" >&2

echo "image: podman import $TAG" >&2
podman import --quiet \
  --change 'USER 10001' \
  --change 'WORKDIR /var/lib/encloud' \
  --change 'ENV PYTHONPATH=/opt/encloud/lib' \
  --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
  --change 'ENV ENCLOUD_MODEL_DIR=/opt/encloud/model' \
  --change 'ENV ENCLOUD_STATE_DIR=/var/lib/encloud' \
  --change 'ENV ENCLOUD_HOST=0.0.0.0' \
  --change 'ENV ENCLOUD_METRICS_HOST=0.0.0.0' \
  --change 'EXPOSE 50051' \
  --change 'EXPOSE 9464' \
  --change 'VOLUME /var/lib/encloud' \
  --change "LABEL dev.encloud.model-digest=$DIGEST" \
  "${EMBEDDINGS_CHANGES[@]}" \
  --change 'LABEL org.opencontainers.image.title=encloud-server' \
  --change 'ENTRYPOINT ["/usr/bin/python3.11", "-m", "encloud.server.app"]' \
  "$work/rootfs.tar" "$TAG" >/dev/null
echo "$TAG"
