"""The serving layer: what runs the models and sessions as services.

- `process`: the one process runner every service uses (settings, logging, tracing, metrics,
  NATS/Redis, health, heartbeat, drain on SIGTERM) and `SessionTasks` supervision.
- `stages/`: stage engines (the compute), backends (in-process or Triton) and stage workers
  (the NATS side of encoder, generator, refiner, decoder).
- `session/`: the public gRPC session API, the per-session control object and its
  distributed chunk pipeline and conversation link.
- `conversation/`: the session-attached workers: dialogue, TTS, publisher.
- `triton/`: the Triton model repository generated from the stage engines.

`docs/architecture.md` draws how they connect."""
