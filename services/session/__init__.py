"""The public `session` service: gRPC SessionService and the per-session runtimes."""
