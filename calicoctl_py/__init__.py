"""calicoctl-py, the operator's CLI."""

import os

# gRPC's C core prints its own TLS handshake failures to stderr, several lines per attempt, before our one-line
# error says what is wrong and what to do. It reads this once, when grpc is first imported: hence here, before
# anything imports it. GRPC_VERBOSITY=DEBUG in the environment still wins, for debugging.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
