"""Cluster membership: what a daemon registers (`members`) and etcd, where it is kept
(`etcd`, through the aetcd client). Neither knows the store's engine, the client or the
server; the server registers, and clients will read the members to place blocks."""
