"""Disaggregated prefill/decode benchmark: a small paged-KV model whose KV moves via the store."""
