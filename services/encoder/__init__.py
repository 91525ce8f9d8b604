"""The `encoder` stage service (see livestage.serving.stage_worker)."""
