"""Benchmark of the offline speech models on this machine's CPU: accuracy and speed per role.

    .work/venv/bin/python loadtests/bench_speech.py [--runs 3] [--threads 2] [--skip-llm]

Prints one JSON object on stdout (logs go to stderr): ASR word error rate on Piper-synthesised
sentences and ASR real-time factor (RTF = compute seconds per second of audio; < 1 is faster than
real time), TTS RTF, LLM decode tokens/s, time to first token and to the first speakable
sentence, and VAD RTF. Timings are medians over `--runs` after a warm-up; the first LLM pass is
reported apart (`cold_first_token_s`), since later turns reuse the persona prompt from
llama.cpp's KV cache as a live session does. The sentences are fixed, so runs compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time

import numpy as np

from livestage.media.audio import resample_audio
from livestage.observability import configure_logging
from livestage.speech import (ChatTurn, PiperSynthesizer, ReplyModelError, TurnDetector, VoiceActivityDetector,
                              WhisperRecognizer, describe_models, word_error_rate)

SENTENCES = ["Please turn on the kitchen lights at seven o'clock.",
             "The weather is lovely today, so let us go for a walk by the river.",
             "What is your name, and what do you like to do on the weekend?",
             "I would like a cup of coffee with milk and no sugar, please.",
             "Tomorrow we are going to visit my grandmother in the old town."]
QUESTIONS = ["Hello! What do you like to do?", "What is the capital of France?",
             "Can you tell me about the sea?", "How are you today?", "What colour is the sky?"]
PERSONA = "Ada is a cheerful painter who lives by the sea and loves to talk about colours."
RATE = 16000


def median(values: list[float]) -> float:
    return round(float(statistics.median(values)), 4) if values else float("nan")


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def bench_tts(tts: PiperSynthesizer, runs: int) -> tuple[dict, list[np.ndarray]]:
    tts.synthesize("Warming up.")
    rtfs = []
    for _ in range(runs):
        for text in SENTENCES:
            audio, seconds = timed(tts.synthesize, text)
            rtfs.append(seconds / (audio.size / tts.sample_rate))
    clips = [resample_audio(tts.synthesize(text), tts.sample_rate, RATE) for text in SENTENCES]
    return {"model": "piper en_US-joe-medium", "rtf_median": median(rtfs),
            "audio_s_median": median([c.size / RATE for c in clips])}, clips


def bench_asr(asr: WhisperRecognizer, clips: list[np.ndarray], runs: int) -> dict:
    pad = np.zeros(int(0.3 * RATE), np.float32)
    padded = [np.concatenate([pad, c, pad]) for c in clips]
    asr.transcribe(padded[0])
    rtfs, latencies, wers, texts = [], [], [], []
    for run in range(runs):
        for ref, clip in zip(SENTENCES, padded):
            result, seconds = timed(asr.transcribe, clip)
            rtfs.append(seconds / result.seconds)
            latencies.append(seconds)
            if run == 0:
                wers.append(word_error_rate(ref, result.text))
                texts.append(result.text)
    return {"model": "whisper tiny.en int8", "wer_mean": round(float(np.mean(wers)), 4),
            "wer_max": round(max(wers), 4), "rtf_median": median(rtfs), "latency_s_median": median(latencies),
            "hypotheses": texts}


def bench_vad(clips: list[np.ndarray], runs: int) -> dict:
    audio = np.concatenate([np.concatenate([c, np.zeros(RATE, np.float32)]) for c in clips])
    rtfs, events = [], []
    for _ in range(runs):
        found, seconds = timed(TurnDetector(VoiceActivityDetector()).push, audio)
        rtfs.append(seconds / (audio.size / RATE))
        events = found
    return {"model": "silero vad v5", "rtf_median": median(rtfs),
            "turns_found": sum(e.kind == "speech_ended" for e in events), "turns_expected": len(clips)}


async def bench_llm(runs: int, threads: int) -> dict:
    from livestage.speech import LocalGGUFReplyModel

    model, load_s = timed(LocalGGUFReplyModel, None, threads)
    first_token, first_sentence, decode_rates, replies = [], [], [], []
    for run in range(runs + 1):
        for question in QUESTIONS:
            started = time.perf_counter()
            deltas: list[str] = []
            sentence_s = 0.0
            async for delta in model.stream_reply(PERSONA, [ChatTurn("user", question)]):
                if not deltas:
                    sentence_s = time.perf_counter() - started
                deltas.append(delta)
            stats = model.last_stats
            if run == 0:  # warm-up pass: prompt-cache misses, reported apart
                replies.append({"q": question, "a": "".join(deltas),
                                "cold_first_token_s": round(stats["first_token_s"], 3)})
                continue
            first_token.append(stats["first_token_s"])
            first_sentence.append(sentence_s)
            if stats["tokens"] > 1:
                decode_rates.append((stats["tokens"] - 1) / max(stats["seconds"] - stats["first_token_s"], 1e-6))
    return {"model": "gemma-3-270m base q4_k_m (llama.cpp)", "load_s": round(load_s, 2),
            "decode_tokens_per_s_median": round(median(decode_rates), 1),
            "first_token_s_median": median(first_token), "first_sentence_s_median": median(first_sentence),
            "replies": replies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-llm", action="store_true")
    args = parser.parse_args()
    configure_logging("bench_speech", "WARNING", stream=sys.stderr)  # stdout is the JSON report

    tts = PiperSynthesizer()
    asr = WhisperRecognizer(threads=args.threads)
    tts_result, clips = bench_tts(tts, args.runs)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
              "runs": args.runs, "tts": tts_result, "asr": bench_asr(asr, clips, args.runs),
              "vad": bench_vad(clips, args.runs)}
    if not args.skip_llm:
        try:
            report["llm"] = asyncio.run(bench_llm(args.runs, args.threads))
        except ReplyModelError as exc:  # llama-cpp-python not installed
            report["llm"] = {"skipped": str(exc)}
    report["models"] = [{k: m[k] for k in ("role", "package", "version", "licence")} for m in describe_models()]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
