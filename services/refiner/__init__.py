"""The `refiner` stage service (see livestage.serving.stage_worker)."""
