#!/usr/bin/env bash
# Regenerates the Python stubs of proto/encloud/v1 into client/v1 (import
# package encloud.client.v1). The output is committed; tests/test_codegen.py
# fails if running this script would change it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-.venv/bin/python}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

PATH="$(dirname "$PYTHON"):$PATH" "$PYTHON" -m grpc_tools.protoc \
  --proto_path=proto \
  --python_out="$out" \
  --mypy_out="$out" \
  --grpc_python_out="$out" \
  --mypy_grpc_out="$out" \
  proto/encloud/v1/*.proto

# protoc names imports after the proto path (encloud.v1); the stubs live in
# encloud.client.v1, so rewrite the package in the generated imports.
for f in "$out"/encloud/v1/*; do
  sed -i -e 's/^from encloud\.v1 import /from encloud.client.v1 import /' \
         -e 's/^import encloud\.v1\./import encloud.client.v1./' "$f"
done

find client/v1 -maxdepth 1 -name '*_pb2*' -delete
cp "$out"/encloud/v1/* client/v1/
