"""gRPC message limits, set explicitly and identically on servers and clients.

Tensors travel in chunks (see :mod:`elasticd.wire`) well below this limit, so
the limit only ever refuses malformed or hostile messages.
"""

MAX_MESSAGE_BYTES = 8 << 20

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
