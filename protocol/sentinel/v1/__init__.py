"""Generated protobuf and gRPC stubs of encloud.sentinel.v1, the key broker (see codegen.sh)."""
