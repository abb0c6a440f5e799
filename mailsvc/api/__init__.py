"""gRPC layer: servicers, interceptors, status mapping."""
