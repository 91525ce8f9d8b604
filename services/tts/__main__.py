"""`python -m services.tts`: reply sentences to the character's speech (queue group worker)."""

from livestage.serving.conversation.tts import run_tts_service

if __name__ == "__main__":
    run_tts_service()
