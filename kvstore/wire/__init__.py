"""The wire beside the core: how kvstore.v1 messages and data-plane frames are laid out.

- `chunks`: the hand-written codec of the two block-carrying messages
  (PutBlocksRequest, GetBlocksResponse), with named field numbers.
- `frames`: the TCP data plane's framing and its socket I/O.
- `lookup`: a LookupPrefixRequest's bytes, for the lookup benchmark's plain baseline.
- `namespace`: Namespace and KVLayout to and from their kvstore.v1 messages.
- `enums`: the core enums to and from the kvstore.v1 enum numbers.
- `errors`: WireError, which the server maps to INVALID_ARGUMENT and the client to
  kvstore.client.ProtocolError.

The core (kvstore.store and friends) never imports this package; the client, the
server and the benchmarks do. docs/protocol.md describes the bytes for other languages.
"""
