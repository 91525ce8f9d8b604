"""The browser playground against a real stack (nats, redis, services, the playground process),
and in Debian's Chromium, headless, with a fake microphone playing a WAV file."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
import subprocess
import time

import aiohttp
import numpy as np
import pytest
from PIL import Image

from livestage.devstack.stack import LocalStack
from livestage.media.audio import write_wav
from livestage.media.samples import sample_speech
from livestage.playground import encode_chunk
from livestage.protos import session_pb2 as pb

from integration.helpers import audio_stream, character, stub


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory):
    s = LocalStack(tmp_path_factory.mktemp("pg"), preset="tiny", playground=True)
    s.start(timeout=180)
    yield s
    s.stop()


def parse_chunk(data: bytes) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    (hlen,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4:4 + hlen])
    off = 4 + hlen
    audio = np.frombuffer(data[off:off + 2 * header["audio_samples"]], "<i2")
    off += 2 * header["audio_samples"]
    frames = []
    for size in header["jpeg_sizes"]:
        frames.append(np.asarray(Image.open(io.BytesIO(data[off:off + size]))))
        off += size
    assert off == len(data)
    return header, audio, frames


def test_chunk_encoding_round_trips():
    ramp = np.linspace(0, 255, 32).astype(np.uint8)  # smooth pictures: JPEG keeps them close
    frames = np.stack([np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((32, 32), 40 * k, np.uint8)), -1)
                       for k in range(8)]).astype(np.uint8)
    audio = np.linspace(-0.5, 0.5, 16000).astype(np.float32)
    header, pcm, decoded = parse_chunk(encode_chunk(3, frames, audio, 8, speaking=True, quality=95))
    assert header["chunk"] == 3 and header["speaking"] and not header["user_speaking"]
    assert len(decoded) == 8 and decoded[0].shape == (32, 32, 3)
    assert all(np.abs(d.astype(int) - f).mean() < 4 for d, f in zip(decoded, frames))
    assert np.allclose(pcm / 32767, audio, atol=1e-4)


async def _session(pg_stack) -> str:
    channel, client = stub(pg_stack.session_address)
    s = await client.CreateSession(pb.CreateSessionRequest(character=character(),
                                                           options=pb.SessionOptions(realtime=True)))
    await client.StartSession(pb.SessionRef(session_id=s.session_id))
    await channel.close()
    return s.session_id


async def test_config_stream_and_microphone_over_http(pg_stack):
    base = f"http://127.0.0.1:{pg_stack.playground_port}"
    sid = await _session(pg_stack)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/sessions/nope/config") as r:
            assert r.status == 404 and (await r.json())["field"] == "session"
        async with http.get(f"{base}/api/sessions/{sid}/config") as r:
            cfg = await r.json()
        assert cfg["mode"] == "stream" and (cfg["fps"], cfg["width"], cfg["sample_rate"]) == (8, 32, 16000)
        async with http.get(f"{base}/") as r:
            assert r.status == 200 and "LiveStage playground" in await r.text()
        async with http.ws_connect(f"{base}/api/sessions/{sid}/stream") as ws:
            msg = await ws.receive(timeout=30)
            header, audio, frames = parse_chunk(msg.data)
            assert len(frames) == 8 and frames[0].shape == (32, 32, 3) and audio.size == 16000
            await ws.send_bytes(b"\x00\x01\x02")  # not whole 16-bit samples
            while True:
                msg = await ws.receive(timeout=30)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    err = json.loads(msg.data)
                    assert err["type"] == "error" and err["field"] == "pcm16"
                    break
            # the user's voice through the socket reaches the session: chunks start hearing it
            voice = (sample_speech(6.0, 16000, seed=2) * 32767).astype("<i2").tobytes()
            for i in range(0, len(voice), 3200):
                await ws.send_bytes(voice[i:i + 3200])
            heard = False
            deadline = time.monotonic() + 40
            while not heard and time.monotonic() < deadline:
                msg = await ws.receive(timeout=30)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    heard = parse_chunk(msg.data)[0]["user_speaking"]
            assert heard, "microphone audio sent over the socket never reached the session"


def test_page_in_headless_chromium_draws_frames_that_change_while_the_character_speaks(pg_stack, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary (scripts/setup_env.sh installs Debian's chromium)")
    base = f"http://127.0.0.1:{pg_stack.playground_port}"
    sid = asyncio.run(_session(pg_stack))
    wav = tmp_path / "mic.wav"
    write_wav(wav, sample_speech(20.0, 16000, seed=4), 16000)
    proc = subprocess.Popen([
        browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={tmp_path / 'profile'}", "--remote-debugging-port=0",
        f"{base}/?session={sid}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def drive() -> tuple[dict, dict]:
        async with aiohttp.ClientSession() as http:
            async def stats() -> dict:
                async with http.get(f"{base}/api/sessions/{sid}/stats") as r:
                    return await r.json() if r.status == 200 else {}

            deadline = time.monotonic() + 60
            before = {}
            while time.monotonic() < deadline:
                before = await stats()
                if before.get("frames_drawn", 0) >= 16:
                    break
                await asyncio.sleep(0.5)
            channel, client = stub(pg_stack.session_address)
            await client.PushSpeakAudio(audio_stream(sid, sample_speech(6.0, 16000, seed=5)))
            await channel.close()
            after = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                after = await stats()
                if after.get("distinct_speaking_frames", 0) >= 8 and after.get("mic_bytes_sent", 0) > 0:
                    break
                await asyncio.sleep(0.5)
            return before, after

    try:
        before, after = asyncio.run(drive())
    finally:
        proc.terminate()
        proc.wait(10)
    assert before.get("frames_drawn", 0) >= 16 and before["mode"] == "stream", before
    assert after["frames_drawn"] > before["frames_drawn"] and after["speaking_chunks"] >= 1, after
    assert after["distinct_speaking_frames"] >= 8, "frames must change while the character speaks"
    assert after["mic_bytes_sent"] > 0 and not [e for e in after["errors"] if "mic" in e], after
