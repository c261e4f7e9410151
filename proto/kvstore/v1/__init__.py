"""Generated wire contract (package kvstore.v1). See proto/generate.py."""
