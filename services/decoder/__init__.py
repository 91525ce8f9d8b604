"""The `decoder` stage service (see livestage.serving.stages.worker)."""
