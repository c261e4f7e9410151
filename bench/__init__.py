"""kvstore.bench: the load-test tool behind `kvstore-bench`."""
