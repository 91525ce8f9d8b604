"""The `playground` service (see livestage.playground)."""
