"""The `refiner` stage service (see livestage.serving.stages.worker)."""
