"""The conversation loop end to end over real NATS, Redis, gRPC and one process per service:
a spoken question -> VAD/ASR transcript -> LLM reply text -> TTS speech -> video chunks, recorded
by the publisher to an MP4 whose audio track is the TTS audio, in sync with the video."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from livestage.devstack.stack import LocalStack
from livestage.devstack.demo import SampleCharacter, drive_demo
from livestage.media.mp4 import read_mp4
from livestage.models.config import get_preset
from livestage.protos import session_pb2 as pb
from livestage.transport import NatsBus, Subjects, to_numpy

from .helpers import audio_stream, character, pcm16, stub

pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by scripts/setup_env.sh")

PRESET = get_preset("tiny")
RATE = PRESET.chunk.sample_rate
FRAME = RATE // PRESET.chunk.fps  # audio samples per video frame


@pytest.fixture(scope="module")
def talk_stack(tmp_path_factory):
    s = LocalStack(tmp_path_factory.mktemp("talk"), preset="tiny", conversation=True,
                   env={"LIVESTAGE_VAD_END_SILENCE_MS": "500"})
    s.start(timeout=240)
    yield s
    s.stop()


class Events:
    def __init__(self, client, session_id: str):
        self.items: list[tuple[float, pb.SessionEvent]] = []
        self.changed = asyncio.Event()
        self._stream = client.StreamEvents(pb.SessionRef(session_id=session_id))
        self.task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        try:
            async for ev in self._stream:
                self.items.append((time.perf_counter(), ev))
                self.changed.set()
        except grpc.aio.AioRpcError:
            pass

    def of(self, kind: str) -> list:
        return [getattr(ev, kind) for _, ev in self.items if ev.WhichOneof("event") == kind]

    def turns(self, turn_kind: int) -> list[pb.TurnEvent]:
        return [t for t in self.of("turn") if t.kind == turn_kind]

    def errors(self) -> list[str]:
        return [f"{e.code}: {e.message}" for e in self.of("error")]

    async def wait(self, predicate, timeout: float = 120.0) -> None:
        """Until `predicate()` holds; a timeout fails with every error event the session sent."""
        async def loop():
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        try:
            await asyncio.wait_for(loop(), timeout)
        except asyncio.TimeoutError:
            kinds = [ev.WhichOneof("event") for _, ev in self.items]
            raise AssertionError(f"not reached in {timeout:.0f} s; errors: {self.errors()}; "
                                 f"{len(kinds)} events: {sorted(set(kinds))}") from None


class SpeakAudioTap:
    """Everything the TTS service publishes for a session (what the MP4 must contain)."""

    def __init__(self):
        self.pieces: list[tuple[int, int, np.ndarray]] = []

    async def start(self, bus: NatsBus, session_id: str) -> "SpeakAudioTap":
        async def on(env, headers, reply):
            speech = env.speak_audio
            self.pieces.append((speech.reply, speech.seq, to_numpy(speech.audio, "audio")))
        await bus.subscribe(Subjects.session_speak_audio(session_id), on)
        return self

    def reply_audio(self, reply: int) -> np.ndarray:
        parts = sorted((seq, a) for r, seq, a in self.pieces if r == reply)
        return np.concatenate([a for _, a in parts]) if parts else np.zeros(0, np.float32)


async def _open(client, realtime: bool = True) -> str:
    sample = SampleCharacter.load()
    s = await client.CreateSession(pb.CreateSessionRequest(
        character=pb.Character(references=[pb.ReferenceImage(kind=pb.REFERENCE_KIND_GLOBAL, image=sample.image)],
                               persona=sample.persona, voice=sample.voice),
        options=pb.SessionOptions(realtime=realtime, seed=1)))
    assert s.placement.dialogue and s.placement.publisher, "conversation workers must be attached"
    assert s.recording.endswith(".mp4")
    return s.session_id


async def _speak_question(client, sid: str, question: np.ndarray, tail_s: float = 1.5) -> None:
    """The question as a microphone would send it: 100 ms frames in real time, then silence."""
    audio = np.concatenate([question, np.zeros(int(tail_s * RATE), np.float32)])
    step = RATE // 10

    async def frames():
        t0 = time.perf_counter()
        for i in range(0, audio.size, step):
            yield pb.AudioChunk(session_id=sid, pcm16=pcm16(audio[i:i + step]), sample_rate=RATE, channels=1)
            await asyncio.sleep(max(t0 + (i + step) / RATE - time.perf_counter(), 0))

    summary = await client.PushUserAudio(frames())
    assert summary.samples_accepted == audio.size


def _locate(haystack: np.ndarray, needle: np.ndarray) -> tuple[int, float]:
    """Offset of `needle` in `haystack` by normalised cross-correlation (FFT), and its score."""
    n = haystack.size + needle.size
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(haystack, size) * np.conj(np.fft.rfft(needle, size)), size)[:haystack.size]
    offset = int(np.argmax(corr))
    seg = haystack[offset:offset + needle.size]
    score = float(np.dot(seg, needle[:seg.size]) / (np.linalg.norm(seg) * np.linalg.norm(needle[:seg.size]) + 1e-9))
    return offset, score


async def test_spoken_question_is_answered_with_tts_speech_in_sync_in_the_recording(talk_stack):
    channel, client = stub(talk_stack)
    bus = await talk_stack.connect_bus()
    sid = await _open(client)
    tap = await SpeakAudioTap().start(bus, sid)
    events = Events(client, sid)
    await client.StartSession(pb.SessionRef(session_id=sid))
    await events.wait(lambda: events.of("chunk_ready"))
    sample = SampleCharacter.load()
    await _speak_question(client, sid, sample.question)

    await events.wait(lambda: events.turns(pb.TURN_KIND_REPLY_FINISHED), timeout=180)
    await events.wait(lambda: events.turns(pb.TURN_KIND_SPEECH_STARTED), timeout=60)
    user_final = [t.text for t in events.of("transcript") if t.final and t.speaker == "user"]
    assert user_final and "name" in user_final[0].lower(), user_final
    turn_order = [t.kind for t in events.of("turn")]
    assert turn_order.index(pb.TURN_KIND_USER_STARTED) < turn_order.index(pb.TURN_KIND_USER_ENDED) \
        < turn_order.index(pb.TURN_KIND_REPLY_STARTED) < turn_order.index(pb.TURN_KIND_REPLY_FINISHED)
    reply_text = "".join(r.delta for r in events.of("reply_text")).strip()
    assert len(reply_text) > 3 and any(r.done for r in events.of("reply_text"))
    reply = events.turns(pb.TURN_KIND_REPLY_STARTED)[0].reply
    tts = tap.reply_audio(reply)
    assert tts.size > RATE // 2, "the reply must be spoken"
    first_speaking_chunk = events.turns(pb.TURN_KIND_SPEECH_STARTED)[0].chunk_index
    # let the whole reply play, then end: the publisher finalises the recording
    spoken_chunks = int(np.ceil(tts.size / RATE)) + 1
    await events.wait(lambda: max([c.chunk_index for c in events.of("chunk_ready")], default=0)
                      >= first_speaking_chunk + spoken_chunks, timeout=120)
    ended = await client.EndSession(pb.SessionRef(session_id=sid))

    frames, audio, fps, rate = read_mp4(ended.recording)
    assert rate == RATE and round(fps) == PRESET.chunk.fps
    video_s, audio_s = frames.shape[0] / fps, audio.size / rate
    assert abs(video_s - audio_s) <= 1 / fps, (video_s, audio_s)
    offset, score = _locate(audio, tts)
    assert score > 0.9, f"the TTS speech is not in the recording (best match {score:.2f})"
    # speech starts at the chunk the session reported as the first answer chunk, within a frame
    assert abs(offset - first_speaking_chunk * RATE) <= FRAME, (offset, first_speaking_chunk)
    latency = [t for t in events.turns(pb.TURN_KIND_SPEECH_STARTED)][0].detail
    assert "after end of user speech" in latency
    events.task.cancel()
    await bus.close()
    await channel.close()


async def test_barge_in_interrupts_the_answer_and_the_new_question_is_heard(talk_stack):
    channel, client = stub(talk_stack)
    sid = await _open(client)
    events = Events(client, sid)
    await client.StartSession(pb.SessionRef(session_id=sid))
    await events.wait(lambda: events.of("chunk_ready"))
    sample = SampleCharacter.load()
    await client.SendText(pb.SendTextRequest(session_id=sid, text="Tell me about the sea, please."))
    await events.wait(lambda: events.turns(pb.TURN_KIND_SPEECH_STARTED), timeout=180)
    speaking_at = events.turns(pb.TURN_KIND_SPEECH_STARTED)[0].chunk_index
    await _speak_question(client, sid, sample.question)  # the user talks over the character
    await events.wait(lambda: events.turns(pb.TURN_KIND_BARGE_IN), timeout=60)
    states = [s.current for s in events.of("state_changed")]
    assert pb.SESSION_STATE_RESPONDING in states
    barge = events.turns(pb.TURN_KIND_BARGE_IN)[0]
    assert barge.chunk_index >= speaking_at
    # the interrupted reply's speech is gone; the new question gets its own reply
    await events.wait(lambda: len(events.turns(pb.TURN_KIND_REPLY_STARTED)) >= 2, timeout=180)
    replies = [t.reply for t in events.turns(pb.TURN_KIND_REPLY_STARTED)]
    assert replies[-1] > barge.reply
    finals = [t.text for t in events.of("transcript") if t.final and t.speaker == "user"]
    assert any("name" in f.lower() for f in finals), finals
    await client.EndSession(pb.SessionRef(session_id=sid))
    events.task.cancel()
    await channel.close()


async def test_bad_user_audio_gets_clear_errors_and_the_session_survives(talk_stack):
    channel, client = stub(talk_stack)
    sid = await _open(client, realtime=False)
    events = Events(client, sid)
    await client.StartSession(pb.SessionRef(session_id=sid))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.PushUserAudio(audio_stream(sid, np.zeros(4410, np.float32), rate=44100))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sample_rate" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.PushUserAudio(audio_stream(sid, np.zeros(40 * RATE, np.float32), block=1 << 20))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pcm16" in err.value.details()
    # stereo is downmixed, silence and noise are heard as no speech
    stereo = np.stack([np.zeros(RATE), np.zeros(RATE)], axis=1).reshape(-1).astype(np.float32)
    assert (await client.PushUserAudio(audio_stream(sid, stereo, channels=2))).samples_accepted == RATE
    noise = (np.random.default_rng(0).standard_normal(5 * RATE) * 0.05).astype(np.float32)
    await client.PushUserAudio(audio_stream(sid, np.concatenate([np.zeros(2 * RATE, np.float32), noise])))
    # 30 minutes in large messages: accepted and bounded (the session keeps a 3 s window, the
    # dialogue caps an utterance at max_utterance_s), the session keeps running
    long = np.zeros(30 * 60 * RATE, np.float32)
    summary = await client.PushUserAudio(audio_stream(sid, long, block=RATE * 30))
    assert summary.seconds_accepted == pytest.approx(1800.0)
    got = await client.GetSession(pb.SessionRef(session_id=sid))
    assert got.state != pb.SESSION_STATE_ENDED
    assert not [t for t in events.of("transcript") if t.final and t.speaker == "user" and len(t.text) > 20]
    await events.wait(lambda: any(e.code == "user_audio_backlog" and e.field == "pcm16" for e in events.of("error")),
                      timeout=30)
    ended = await client.EndSession(pb.SessionRef(session_id=sid))
    assert ended.state == pb.SESSION_STATE_ENDED
    events.task.cancel()
    await channel.close()


def test_the_main_job_leaves_an_mp4_and_latencies(talk_stack, tmp_path):
    summary = asyncio.run(drive_demo(talk_stack.session_address, tmp_path / "demo.mp4", api_key=talk_stack.api_key,
                                     timeout_s=180, echo=False))
    assert summary["out"] and (tmp_path / "demo.mp4").stat().st_size > 0
    assert summary["end_of_user_speech_to_first_answer_frame_s"] is not None
    assert 0 < summary["end_of_user_speech_to_first_answer_frame_s"] < 60
    assert summary["fps_delivered"] > 0 and "name" in summary["user_said"].lower()


def test_viewer_tokens_are_subscribe_only_and_an_unreachable_livekit_is_a_clear_error(tmp_path):
    from livekit import api

    key, secret = "devkey", "livestage-test-secret-0123456789-abcdef"
    env = {"LIVESTAGE_LIVEKIT_URL": "ws://127.0.0.1:9", "LIVESTAGE_LIVEKIT_PUBLIC_URL": "wss://live.example",
           "LIVESTAGE_LIVEKIT_API_KEY": key, "LIVESTAGE_LIVEKIT_API_SECRET": secret}
    with LocalStack(tmp_path / "lk", preset="tiny", env=env) as s:
        s.start_stage("publisher", "publisher-1")
        s.wait_for_workers({"publisher": 1}, timeout=60)

        async def run():
            channel, client = stub(s)
            # the publisher cannot join a room on a LiveKit server that is not there
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.CreateSession(pb.CreateSessionRequest(character=character(), livekit_room="room-7"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "publisher" in err.value.details()
            s.services["publisher-1"].stop()
            await asyncio.sleep(1.0)
            sess = await client.CreateSession(pb.CreateSessionRequest(character=character(), livekit_room="room-7"))
            assert sess.livekit_url == "wss://live.example"
            tok = await client.CreateViewerToken(pb.ViewerTokenRequest(session_id=sess.session_id, identity="alice"))
            claims = api.TokenVerifier(key, secret).verify(tok.token)
            # rooms are namespaced by tenant; a failed create gave its room back
            assert tok.room == sess.livekit_room == "dev_room-7" and tok.livekit_url == "wss://live.example"
            assert claims.identity == "alice" and claims.video.room == "dev_room-7" and claims.video.can_subscribe
            assert not claims.video.can_publish and not claims.video.can_publish_data
            for bad, field in ((pb.ViewerTokenRequest(session_id=sess.session_id), "identity"),
                               (pb.ViewerTokenRequest(session_id=sess.session_id, identity="a", ttl_s=5), "ttl_s")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.CreateViewerToken(bad)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
            await channel.close()

        asyncio.run(run())


async def test_viewer_tokens_need_livekit(talk_stack):
    channel, client = stub(talk_stack)
    sid = await _open(client)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.CreateViewerToken(pb.ViewerTokenRequest(session_id=sid, identity="alice"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "LIVESTAGE_LIVEKIT_URL" in err.value.details()
    await client.EndSession(pb.SessionRef(session_id=sid))
    await channel.close()
