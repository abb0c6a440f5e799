"""mailsvc: a gRPC mail service."""
