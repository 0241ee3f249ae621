"""Transport: gRPC service, mutual TLS from startup kits, streaming; in-process transport."""
