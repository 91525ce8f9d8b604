"""The `decoder` stage service (see livestage.serving.stage_worker)."""
