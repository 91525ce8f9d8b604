"""The `encoder` stage service (see livestage.serving.stages.worker)."""
