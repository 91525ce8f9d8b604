"""The main job: the whole stack on loopback, a bundled character asked a bundled question.

`make demo` (= `livestage demo`) starts nats, redis and every service (conversation included),
opens a session with the sample character, speaks the sample question into it in real time as a
user's microphone would, waits for the answer to be spoken, and leaves the MP4 the publisher
recorded (the character listening, then answering) plus printed latencies: end of the user's
speech -> first answer frame, and frames per second delivered.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from livestage.client import session_channel
from livestage.devstack.stack import LocalStack
from livestage.media.samples import SampleCharacter
from livestage.protos import session_pb2 as pb
from livestage.protos import session_pb2_grpc

FRAME_S = 0.1


def character_proto(character: SampleCharacter) -> pb.Character:
    """The sample character as the session API takes it: every reference image, persona, voice."""
    kinds = {"global": pb.REFERENCE_KIND_GLOBAL, "view": pb.REFERENCE_KIND_VIEW,
             "expression": pb.REFERENCE_KIND_EXPRESSION}
    return pb.Character(references=[pb.ReferenceImage(kind=kinds[k], image=data) for k, data in character.references],
                        persona=character.persona, voice=character.voice)


def speech_end_s(samples: np.ndarray, rate: int = 16000) -> float:
    """Where the last speech in `samples` ends (20 ms frames above 2% of the peak level)."""
    hop = rate // 50
    n = samples.size // hop
    rms = np.sqrt((samples[: n * hop].reshape(n, hop) ** 2).mean(axis=1))
    loud = np.nonzero(rms > 0.02 * max(float(rms.max()), 1e-9))[0]
    return float((loud[-1] + 1) * hop / rate) if loud.size else 0.0


@dataclass
class DemoRun:
    events: list[tuple[float, pb.SessionEvent]] = field(default_factory=list)
    speech_pushed_end: float | None = None
    first_chunk_at: float | None = None
    frames: int = 0
    answer_frame_at: float | None = None
    reply_finished: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    user_text: str = ""
    reply_text: str = ""
    marks: dict[str, float] = field(default_factory=dict)
    """First time each milestone was seen (perf_counter): user_ended, transcript, reply_started..."""

    def mark(self, name: str, at: float) -> None:
        self.marks.setdefault(name, at)

    def on_event(self, ev: pb.SessionEvent, echo: bool) -> None:
        now = time.perf_counter()
        self.events.append((now, ev))
        kind = ev.WhichOneof("event")
        if kind == "chunk_ready":
            self.frames += ev.chunk_ready.frames
            if self.first_chunk_at is None:
                self.first_chunk_at = now
        elif kind == "transcript" and ev.transcript.final:
            if ev.transcript.speaker == "user":
                self.user_text = ev.transcript.text
                self.mark("final_transcript", now)
            if echo:
                print(f"[{ev.transcript.speaker}] {ev.transcript.text}", flush=True)
        elif kind == "reply_text":
            self.reply_text += ev.reply_text.delta
            self.mark("first_reply_text", now)
        elif kind == "turn":
            names = {pb.TURN_KIND_USER_ENDED: "vad_end_of_turn", pb.TURN_KIND_REPLY_STARTED: "reply_started",
                     pb.TURN_KIND_SPEECH_STARTED: "first_answer_frame"}
            if ev.turn.kind in names:
                self.mark(names[ev.turn.kind], now)
            if ev.turn.kind == pb.TURN_KIND_SPEECH_STARTED and self.answer_frame_at is None:
                self.answer_frame_at = now
                if echo:
                    print(f"[turn] first answer frame at chunk {ev.turn.chunk_index} ({ev.turn.detail})", flush=True)
            elif ev.turn.kind == pb.TURN_KIND_REPLY_FINISHED:
                self.reply_finished.set()
        elif kind == "state_changed":
            if (self.reply_finished.is_set() and ev.state_changed.previous == pb.SESSION_STATE_RESPONDING):
                self.done.set()
        elif kind == "error" and echo:
            print(f"[error] {ev.error.code}: {ev.error.message}", flush=True)


async def _push_user_audio(stub, session_id: str, audio: np.ndarray, run: DemoRun, tail_s: float,
                           speech_end: float) -> None:
    """The user's microphone: the question, then silence while the character answers."""
    step = int(16000 * FRAME_S)
    t0 = time.perf_counter()

    async def frames():
        i = 0
        total = audio.size + int(tail_s * 16000)
        while i < total and not run.done.is_set():
            piece = audio[i:i + step] if i < audio.size else np.zeros(step, np.float32)
            if piece.size < step:
                piece = np.concatenate([piece, np.zeros(step - piece.size, np.float32)])
            yield pb.AudioChunk(session_id=session_id, sample_rate=16000, channels=1,
                                pcm16=(np.clip(piece, -1, 1) * 32767).astype("<i2").tobytes())
            i += step
            if run.speech_pushed_end is None and i / 16000 >= speech_end:
                run.speech_pushed_end = time.perf_counter()
            due = t0 + i / 16000
            await asyncio.sleep(max(due - time.perf_counter(), 0))

    await stub.PushUserAudio(frames())


async def drive_demo(address: str, out: Path, *, api_key: str, lead_in_s: float = 1.0, timeout_s: float = 180.0,
                     echo: bool = True) -> dict:
    """Runs one conversation against a running stack; returns the summary (also the MP4 path)."""
    character = SampleCharacter.load()
    lead = np.zeros(int(lead_in_s * 16000), np.float32)
    audio = np.concatenate([lead, character.question])
    speech_end = speech_end_s(audio)
    run = DemoRun()
    async with session_channel(address, api_key) as ch:
        stub = session_pb2_grpc.SessionServiceStub(ch)
        session = await stub.CreateSession(pb.CreateSessionRequest(
            character=character_proto(character), options=pb.SessionOptions(seed=0, realtime=True)))
        sid = session.session_id
        events = stub.StreamEvents(pb.SessionRef(session_id=sid))

        async def follow() -> None:
            async for ev in events:
                run.on_event(ev, echo)

        follower = asyncio.create_task(follow())
        started = time.perf_counter()
        await stub.StartSession(pb.SessionRef(session_id=sid))
        while run.first_chunk_at is None and time.perf_counter() - started < 60:
            await asyncio.sleep(0.05)
        if echo:
            print(f"[user] (speaking) {character.question_text}", flush=True)
        pusher = asyncio.create_task(_push_user_audio(stub, sid, audio, run, timeout_s, speech_end))
        try:
            await asyncio.wait_for(run.done.wait(), timeout_s)
        except asyncio.TimeoutError:
            if echo:
                print("[demo] timed out waiting for the answer to finish", flush=True)
        run.done.set()
        await pusher
        ended = await stub.EndSession(pb.SessionRef(session_id=sid))
        follower.cancel()
        wall = time.perf_counter() - (run.first_chunk_at or started)
    recording = Path(ended.recording) if ended.recording else None
    out.parent.mkdir(parents=True, exist_ok=True)
    if recording is not None and recording.is_file():
        shutil.copyfile(recording, out)
    latency = (run.answer_frame_at - run.speech_pushed_end
               if run.answer_frame_at is not None and run.speech_pushed_end is not None else None)
    breakdown = {}
    if run.speech_pushed_end is not None:
        breakdown = {name: round(at - run.speech_pushed_end, 3) for name, at in
                     sorted(run.marks.items(), key=lambda kv: kv[1])}
    return {"event": "done", "out": str(out) if recording else "", "session_id": sid,
            "user_said": run.user_text, "character_said": run.reply_text.strip(),
            "end_of_user_speech_to_first_answer_frame_s": None if latency is None else round(latency, 3),
            "after_end_of_user_speech_s": breakdown,
            "fps_delivered": round(run.frames / wall, 2) if wall > 0 else None,
            "frames": run.frames, "chunks": ended.chunks_played, "weights": ended.weights}


def run_demo(preset: str = "demo", out: str | Path = "out/demo.mp4",
             workdir: str | Path = ".work/demo", timeout_s: float = 180.0) -> dict:
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    print(f"[demo] starting nats, redis and every service (preset {preset})...", flush=True)
    with LocalStack(workdir, preset=preset, conversation=True) as stack:
        if not stack.api_key:
            raise RuntimeError("LIVESTAGE_TENANTS_FILE is set: set LIVESTAGE_API_KEY to one of its tenants' keys")
        if stack.credentials is not None and stack.credentials.api_key_file is not None:
            print(f"[demo] development API key: {stack.credentials.api_key_file}", flush=True)
        summary = asyncio.run(drive_demo(stack.session_address, Path(out), api_key=stack.api_key,
                                         timeout_s=timeout_s))
    print(json.dumps(summary), flush=True)
    return summary
