"""Speech models of the conversation loop: voice activity and end of turn, recognition, replies,
synthesis, and the client of an external audio-to-audio system. The offline defaults ship as
pinned registry packages (`describe_models()`); each can be replaced by a path or an endpoint.

Heavy runtimes (faster-whisper, llama.cpp, piper, silero) are imported when a model is built,
so importing this package stays cheap for services that use only part of it."""

from livestage.speech.a2a import A2AEvent, AudioToAudioClient
from livestage.speech.asr import SpeechRecognizer, StreamingTranscriber, Transcription, WhisperRecognizer
from livestage.speech.assets import ASSETS, ModelAsset, ModelIntegrityError, describe_models
from livestage.speech.llm import LocalGGUFReplyModel, OpenAIChatReplyModel, ReplyModel, ReplyModelError
from livestage.speech.metrics import word_error_rate
from livestage.speech.reply_text import FALLBACK_REPLY, ChatTurn, ReplyGuard, build_prompt
from livestage.speech.sentences import SentenceSplitter
from livestage.speech.tts import HttpSpeechSynthesizer, PiperSynthesizer, SpeechSynthesisError, SpeechSynthesizer
from livestage.speech.vad import TurnDetector, TurnEvent, VoiceActivityDetector

__all__ = ["A2AEvent", "ASSETS", "AudioToAudioClient", "ChatTurn", "FALLBACK_REPLY", "HttpSpeechSynthesizer",
           "LocalGGUFReplyModel", "ModelAsset", "ModelIntegrityError", "OpenAIChatReplyModel",
           "PiperSynthesizer", "ReplyGuard", "ReplyModel", "ReplyModelError", "SentenceSplitter",
           "SpeechRecognizer", "SpeechSynthesisError", "SpeechSynthesizer", "StreamingTranscriber",
           "Transcription", "TurnDetector", "TurnEvent", "VoiceActivityDetector", "WhisperRecognizer",
           "build_prompt", "describe_models", "word_error_rate"]
