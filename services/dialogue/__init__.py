"""The `dialogue` service (see livestage.serving.dialogue_worker)."""
