"""Workers attached to a whole session: dialogue (listen, decide, answer), TTS, publisher."""
