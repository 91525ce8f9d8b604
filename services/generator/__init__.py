"""The `generator` stage service (see livestage.serving.stage_worker)."""
