"""The `dialogue` service (see livestage.serving.conversation.dialogue)."""
