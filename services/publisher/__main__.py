"""`python -m services.publisher`: frames and speech to LiveKit, or to an MP4 recording."""

from livestage.serving.conversation.publisher import run_publisher_service

if __name__ == "__main__":
    run_publisher_service()
