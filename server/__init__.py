"""encloud's server: runs inside the CVM (docs/ARCHITECTURE.md).

gRPC core's own stderr log lines are plain text beside our JSON log, and its errors are
reported through our own (a failed bind becomes one line naming the setting): they are off
unless the operator sets GRPC_VERBOSITY. Set here, before anything imports grpc.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
