"""`python -m services.dialogue`: VAD, speech recognition and replies for attached sessions."""

from livestage.serving.conversation.dialogue import run_dialogue_service

if __name__ == "__main__":
    run_dialogue_service()
