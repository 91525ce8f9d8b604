"""The `publisher` service (see livestage.serving.conversation.publisher)."""
