"""The `tts` service (see livestage.serving.tts_worker)."""
