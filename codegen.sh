#!/usr/bin/env bash
# Regenerates the Python stubs of proto/encloud/v2 into protocol/v2 (import
# package encloud.protocol.v2) and of proto/encloud/sentinel/v1 (the key broker) into
# protocol/sentinel/v1 (encloud.protocol.sentinel.v1). The output is committed;
# tests/test_contract.py fails if running this script would change it.
set -euo pipefail
cd "$(dirname "$0")"
# The project's environment if ./dev made one; else a small tool environment
# (.codegen-venv) with the generator versions pinned in requirements/dev.lock, so
# the output is the same wherever this runs.
pinned() { grep -m1 "^$1==" requirements/dev.lock | cut -d' ' -f1; }
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
  else
    PYTHON=.codegen-venv/bin/python
    if ! [ -x "$PYTHON" ] || ! "$PYTHON" -c "import grpc_tools, mypy_protobuf" 2>/dev/null; then
      python3 -m venv .codegen-venv
      "$PYTHON" -m pip install --quiet "$(pinned grpcio-tools)" "$(pinned grpcio)" \
        "$(pinned protobuf)" "$(pinned mypy-protobuf)" "$(pinned types-protobuf)"
    fi
  fi
fi
if ! "$PYTHON" -c "import grpc_tools, mypy_protobuf" 2>/dev/null; then
  echo "codegen.sh: $PYTHON lacks grpcio-tools and mypy-protobuf" >&2
  exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

PATH="$(dirname "$(command -v "$PYTHON")"):$PATH" "$PYTHON" -m grpc_tools.protoc \
  --proto_path=proto \
  --python_out="$out" \
  --mypy_out="$out" \
  --grpc_python_out="$out" \
  --mypy_grpc_out="$out" \
  proto/encloud/v2/*.proto proto/encloud/sentinel/v1/*.proto

# protoc names imports after the proto path (encloud.v2); the stubs live in
# encloud.protocol.v2, so rewrite the package in the generated imports.
for f in "$out"/encloud/v2/* "$out"/encloud/sentinel/v1/*; do
  sed -i -e 's/^from encloud\.v2 import /from encloud.protocol.v2 import /' \
         -e 's/^import encloud\.v2\./import encloud.protocol.v2./' \
         -e 's/^from encloud\.sentinel\.v1 import /from encloud.protocol.sentinel.v1 import /' \
         -e 's/^import encloud\.sentinel\.v1\./import encloud.protocol.sentinel.v1./' "$f"
done

find protocol/v2 protocol/sentinel/v1 -maxdepth 1 -name '*_pb2*' -delete
cp "$out"/encloud/v2/* protocol/v2/
cp "$out"/encloud/sentinel/v1/* protocol/sentinel/v1/
