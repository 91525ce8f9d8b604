"""The conversation loop on the whole stack (real processes): end of user speech -> first answer
frame, and barge-in: user speech over the character -> interrupt, in seconds and in chunks.

    .work/venv/bin/python loadtests/bench_conversation.py --preset tiny --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from livestage.client import session_channel
from livestage.devstack.demo import SampleCharacter, drive_demo
from livestage.devstack.stack import LocalStack
from livestage.protos import session_pb2 as pb
from livestage.protos import session_pb2_grpc


async def _speaking(client, sid: str) -> bool:
    s = await client.GetSession(pb.SessionRef(session_id=sid))
    return s.state == pb.SESSION_STATE_RESPONDING


async def barge_in_once(address: str, api_key: str) -> dict:
    sample = SampleCharacter.load()
    async with session_channel(address, api_key) as ch:
        client = session_pb2_grpc.SessionServiceStub(ch)
        s = await client.CreateSession(pb.CreateSessionRequest(
            character=pb.Character(references=[pb.ReferenceImage(kind=pb.REFERENCE_KIND_GLOBAL, image=sample.image)],
                                   persona=sample.persona),
            options=pb.SessionOptions(realtime=True)))
        sid = s.session_id
        seen: dict[str, float] = {}
        chunks: dict[str, int] = {}
        latest = {"chunk": -1}
        done = asyncio.Event()

        async def follow() -> None:
            async for ev in client.StreamEvents(pb.SessionRef(session_id=sid)):
                kind = ev.WhichOneof("event")
                if kind == "chunk_ready":
                    latest["chunk"] = ev.chunk_ready.chunk_index
                elif kind == "turn":
                    name = pb.TurnKind.Name(ev.turn.kind)
                    seen.setdefault(name, time.perf_counter())
                    chunks.setdefault(name, ev.turn.chunk_index)
                    if ev.turn.kind == pb.TURN_KIND_BARGE_IN:
                        done.set()

        task = asyncio.create_task(follow())
        await client.StartSession(pb.SessionRef(session_id=sid))
        # the character speaks for 8 s (speech from an external TTS: a long reply, whatever the LLM says)
        from livestage.media.samples import sample_speech

        long_reply = (sample_speech(8.0, 16000, seed=9) * 32767).astype("<i2").tobytes()

        async def speak():
            for i in range(0, len(long_reply), 32000):
                yield pb.AudioChunk(session_id=sid, sample_rate=16000, channels=1, pcm16=long_reply[i:i + 32000])

        while latest["chunk"] < 1:
            await asyncio.sleep(0.05)
        await client.PushSpeakAudio(speak())
        while latest["chunk"] < 0 or not await _speaking(client, sid):
            await asyncio.sleep(0.05)
        started, chunk_at_start = time.perf_counter(), latest["chunk"]
        audio = sample.question[8000:]  # the sample question starts with 0.5 s of silence

        async def frames():
            for i in range(0, audio.size, 1600):
                yield pb.AudioChunk(session_id=sid, sample_rate=16000, channels=1,
                                    pcm16=(np.clip(audio[i:i + 1600], -1, 1) * 32767).astype("<i2").tobytes())
                await asyncio.sleep(0.1)  # a microphone: real time

        async def push() -> None:
            await client.PushUserAudio(frames())

        pusher = asyncio.create_task(push())
        try:
            await asyncio.wait_for(done.wait(), 30)
        except asyncio.TimeoutError:
            raise RuntimeError(f"no barge-in; turns seen: {[(k, round(v - started, 2), chunks[k]) for k, v in sorted(seen.items(), key=lambda kv: kv[1])]}") from None
        result = {"barge_in_s": seen["TURN_KIND_BARGE_IN"] - started,
                  "chunks_after_voice": chunks["TURN_KIND_BARGE_IN"] - chunk_at_start}
        await pusher
        await client.EndSession(pb.SessionRef(session_id=sid))
        task.cancel()
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="", help="keep the stack's logs here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalStack(Path(args.workdir or tmp), preset=args.preset, conversation=True) as stack:
        answers, barges = [], []
        for i in range(args.runs):
            barges.append(asyncio.run(barge_in_once(stack.session_address, stack.api_key)))
            summary = asyncio.run(drive_demo(stack.session_address, Path(tmp) / f"run{i}.mp4",
                                                api_key=stack.api_key, echo=False))
            answers.append(summary)
    latency = [a["end_of_user_speech_to_first_answer_frame_s"] for a in answers if a["end_of_user_speech_to_first_answer_frame_s"]]
    print(json.dumps({
        "preset": args.preset, "runs": args.runs,
        "end_of_user_speech_to_first_answer_frame_s_median": round(statistics.median(latency), 3) if latency else None,
        "breakdown_of_first_run_s": answers[0]["after_end_of_user_speech_s"],
        "fps_delivered_median": round(statistics.median(a["fps_delivered"] for a in answers), 2),
        "barge_in_s_median": round(statistics.median(b["barge_in_s"] for b in barges), 3),
        "barge_in_chunks_after_voice": [b["chunks_after_voice"] for b in barges],
    }, indent=1))


if __name__ == "__main__":
    main()
