"""The publisher's library with the real livekit / livekit-api packages, as far as they go
without a LiveKit server (the room itself is `LoopbackRoomLink`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from livekit import api, rtc

from livestage.media.mp4 import read_mp4
from livestage.publishing import (AUDIO_STREAM_TOPIC, RPC_CLEAR_BUFFER, RPC_PLAYBACK_FINISHED, AVChunk,
                                  AvatarDataStreamBridge, FrameAudioAligner, LiveKitSink, LoopbackRoomLink,
                                  Mp4RecorderSink, avatar_token, to_rtc_frames, viewer_token)

KEY, SECRET = "devkey", "a-secret-that-is-long-enough-for-hs256-0123"


def chunk(k: int, fps: int = 8, rate: int = 16000, size: int = 32, audio_len: int | None = None) -> AVChunk:
    frames = np.full((fps, size, size, 3), (k * 40) % 255, np.uint8)
    n = rate if audio_len is None else audio_len
    audio = (np.sin(np.arange(n) * 2 * np.pi * 440 / rate) * 0.3).astype(np.float32)
    return AVChunk(k, frames, audio, rate, fps)


def test_viewer_tokens_are_subscribe_only_and_avatar_tokens_can_publish():
    claims = api.TokenVerifier(KEY, SECRET).verify(viewer_token(KEY, SECRET, "room-1", "alice", ttl_s=600))
    g = claims.video
    assert claims.identity == "alice" and g.room == "room-1" and g.room_join and g.can_subscribe
    assert g.can_publish is False and g.can_publish_data is False
    claims = api.TokenVerifier(KEY, SECRET).verify(avatar_token(KEY, SECRET, "room-1", publish_on_behalf="agent-7"))
    assert claims.kind == "agent" and claims.video.can_publish and claims.video.can_publish_data
    assert claims.attributes["lk.publish_on_behalf"] == "agent-7"
    with pytest.raises(api.access_token.jwt.InvalidSignatureError):
        api.TokenVerifier(KEY, SECRET + "x").verify(viewer_token(KEY, SECRET, "r", "bob"))
    for bad in ({"room": ""}, {"identity": " "}, {"api_key": ""}):
        args = {"api_key": KEY, "api_secret": SECRET, "room": "r", "identity": "bob", **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            viewer_token(**args)


def test_frame_audio_split_never_loses_a_sample_at_uneven_rates():
    aligner = FrameAudioAligner(16000, 24)
    chunks = [chunk(k, fps=24) for k in range(3)]
    pieces = [a for c in chunks for _, a in aligner.split(c)]
    assert len(pieces) == 72 and {p.size for p in pieces} == {666, 667}
    assert np.array_equal(np.concatenate(pieces), np.concatenate([c.audio for c in chunks]))
    assert aligner.drift_samples == 0
    short = FrameAudioAligner(16000, 8).split(chunk(0, audio_len=15000))
    assert sum(a.size for _, a in short) == 16000  # padded to the frames' span
    with pytest.raises(ValueError, match="frames"):
        FrameAudioAligner(16000, 8).split(AVChunk(0, np.zeros((8, 4, 4), np.uint8), np.zeros(16000, np.float32), 16000, 8))
    with pytest.raises(ValueError, match="audio"):
        FrameAudioAligner(16000, 8).split(AVChunk(0, np.zeros((8, 4, 4, 3), np.uint8), np.zeros((16000, 2), np.float32), 16000, 8))


def test_rtc_frames_carry_the_pixels_and_samples():
    frame = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    video, audio = to_rtc_frames(frame, np.full(2000, 0.5, np.float32), 16000)
    assert (video.width, video.height, video.type) == (24, 16, rtc.VideoBufferType.RGB24)
    assert np.array_equal(np.frombuffer(video.data, np.uint8).reshape(16, 24, 3), frame)
    assert video.convert(rtc.VideoBufferType.I420).type == rtc.VideoBufferType.I420
    assert audio.samples_per_channel == 2000 and audio.sample_rate == 16000
    assert np.frombuffer(audio.data, np.int16)[0] == 16383


async def test_mp4_recording_keeps_audio_and_video_together(tmp_path):
    sink = Mp4RecorderSink(tmp_path / "s.mp4")
    played = []

    async def on_played(k, pos):
        played.append((k, pos))

    sink.on_played = on_played
    await sink.start(32, 32, 8, 16000)
    for k in range(3):
        await sink.write(chunk(k, audio_len=16000 + (200 if k == 1 else 0)))
    assert await sink.clear(1) == 0
    await sink.close()
    frames, audio, fps, rate = read_mp4(tmp_path / "s.mp4")
    assert frames.shape[0] == 24 and round(fps) == 8 and rate == 16000
    assert abs(audio.size / rate - frames.shape[0] / fps) <= 1 / fps
    assert played == [(0, 1.0), (1, 2.0), (2, 3.0)] and sink.drift_samples == 200
    assert abs(int(frames[8].mean()) - 40) <= 3 and abs(int(frames[16].mean()) - 80) <= 3


async def test_livekit_sink_publishes_tracks_lazily_paces_frames_and_clears():
    room = LoopbackRoomLink()
    sink = LiveKitSink(room)
    played = []

    async def on_played(k, pos):
        played.append(k)

    sink.on_played = on_played
    await sink.start(32, 32, 8, 16000)
    assert room.published == []  # nothing before the first frame
    await sink.write(chunk(0))
    for k in range(1, 4):
        await sink.write(chunk(k))
    dropped = await sink.clear(1)  # interrupt: chunks 2 and 3 may still be queued
    import asyncio

    for _ in range(100):
        if played and played[-1] >= 1 and sink._queue.empty():
            break
        await asyncio.sleep(0.05)
    await sink.close()
    kinds = [opts.source for _, opts in room.published]
    assert kinds == [rtc.TrackSource.SOURCE_MICROPHONE, rtc.TrackSource.SOURCE_CAMERA]
    assert [t.name for t, _ in room.published] == ["avatar_audio", "avatar_video"]
    assert played[:2] == [0, 1] and dropped + 8 * len(played) == 32
    assert sink.position_s == pytest.approx(len(played))


async def test_a_livekit_sink_whose_pump_died_refuses_the_next_chunk():
    import asyncio

    class BrokenRoom(LoopbackRoomLink):
        async def publish_track(self, track, options):
            raise ConnectionError("room closed by the server")

    sink = LiveKitSink(BrokenRoom())
    await sink.start(32, 32, 8, 16000)
    await sink.write(chunk(0))  # the pump dies publishing its tracks
    for _ in range(100):
        if sink._pump.done():
            break
        await asyncio.sleep(0.02)
    with pytest.raises(RuntimeError, match="room closed by the server"):
        await sink.write(chunk(1))
    await sink.close()


async def test_avatar_data_stream_protocol_in_and_out():
    room = LoopbackRoomLink()
    got, ends, clears = [], [], []

    async def on_audio(samples, rate):
        got.append((samples, rate))

    async def on_end():
        ends.append(1)

    async def on_clear():
        clears.append(1)

    bridge = AvatarDataStreamBridge(room, on_audio, on_end, on_clear)
    pcm = (np.arange(4801) % 100 * 100).astype("<i2")
    data = pcm.tobytes() + b"\x01"  # odd tail byte
    await room.send_byte_stream(AUDIO_STREAM_TOPIC, "agent-1", {"sample_rate": "24000", "num_channels": "1"},
                                [data[:1000], data[1000:5001], data[5001:]])
    audio = np.concatenate([a for a, _ in got])
    assert {r for _, r in got} == {24000} and np.allclose(audio * 32768, pcm, atol=1) and ends == [1]
    stereo = np.stack([pcm[:100], pcm[:100]], 1).astype("<i2").tobytes()
    await room.send_byte_stream(AUDIO_STREAM_TOPIC, "agent-1", {"sample_rate": "16000", "num_channels": "2"}, [stereo])
    assert got[-1][0].size == 100
    for attrs in ({"sample_rate": "abc"}, {"sample_rate": "1000000"}, {"sample_rate": "16000", "num_channels": "6"}):
        await room.send_byte_stream(AUDIO_STREAM_TOPIC, "agent-1", attrs, [b"\x00\x00"])
    assert len(bridge.rejected) == 3 and len(ends) == 2
    assert await room.invoke_rpc(RPC_CLEAR_BUFFER, "agent-1") == "ok" and clears == [1]
    await bridge.notify_playback_finished(2.5, True)
    dest, method, payload = room.rpcs_sent[-1]
    assert (dest, method) == ("agent-1", RPC_PLAYBACK_FINISHED)
    assert json.loads(payload) == {"playback_position": 2.5, "interrupted": True}
