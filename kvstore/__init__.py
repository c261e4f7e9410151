"""kvstore: a disaggregated, tiered KV-cache memory service for LLM serving.

This package is the core: keys and hashing, KV layout and codec, the page arena, the
block index, eviction, the tiers and the store. It imports neither gRPC nor the
client or the server; `kvstore.client`, `kvstore.server` and `kvstore.bench` sit on it.
"""
