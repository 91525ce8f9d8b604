"""The `publisher` service (see livestage.serving.publisher_worker)."""
