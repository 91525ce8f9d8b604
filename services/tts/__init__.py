"""The `tts` service (see livestage.serving.conversation.tts)."""
