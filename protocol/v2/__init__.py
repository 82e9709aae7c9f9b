"""Generated protobuf and gRPC stubs of encloud.v2 (see codegen.sh)."""
