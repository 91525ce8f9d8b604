"""The public session API: gRPC servicer, per-session control, distributed chunk pipeline."""
