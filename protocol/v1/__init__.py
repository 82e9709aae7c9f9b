"""Generated protobuf and gRPC stubs of encloud.v1 (see codegen.sh)."""
