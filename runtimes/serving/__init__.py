"""Serving: the KServe v2 HTTP and gRPC server, its batcher, metrics and options."""
