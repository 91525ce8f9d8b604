"""The `generator` stage service (see livestage.serving.stages.worker)."""
