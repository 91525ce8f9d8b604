"""Media input errors are one line and name the problem; MP4 output keeps audio and video in sync."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from livestage.media import MediaError, Mp4Writer, load_audio, load_image, read_mp4, write_wav


def test_image_loading_and_errors(tmp_path):
    Image.new("RGB", (200, 100), (255, 0, 0)).save(tmp_path / "wide.png")
    img = load_image(tmp_path / "wide.png", (32, 32))
    assert img.shape == (3, 32, 32) and float(img[0].mean()) > 0.9 and float(img[1].mean()) < -0.9
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(MediaError, match="not a readable image"):
        load_image(tmp_path / "corrupt.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(MediaError, match="empty image"):
        load_image(tmp_path / "empty.png")


def test_audio_loading_and_errors(tmp_path):
    t = np.arange(16000) / 16000
    write_wav(tmp_path / "ok.wav", 0.5 * np.sin(2 * np.pi * 220 * t), 16000)
    samples = load_audio(tmp_path / "ok.wav", 16000)
    assert samples.shape == (16000,) and 0.45 < np.abs(samples).max() < 0.55
    write_wav(tmp_path / "44k.wav", np.zeros(44100), 44100)
    with pytest.raises(MediaError, match="sample rate is 44100 Hz, expected 16000 Hz"):
        load_audio(tmp_path / "44k.wav", 16000)
    assert load_audio(tmp_path / "44k.wav", 16000, resample=True).shape == (16000,)
    stereo = np.stack([np.ones(1600) * 0.5, -np.ones(1600) * 0.5], axis=1).reshape(-1)
    write_wav(tmp_path / "stereo.wav", stereo, 16000, channels=2)
    assert np.abs(load_audio(tmp_path / "stereo.wav")).max() < 1e-3  # averaged to mono
    write_wav(tmp_path / "zero.wav", np.zeros(0), 16000)
    with pytest.raises(MediaError, match="zero-length"):
        load_audio(tmp_path / "zero.wav")
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    with pytest.raises(MediaError, match="not"):
        load_audio(tmp_path / "picture.png")
    (tmp_path / "text.wav").write_text("this is not audio")
    with pytest.raises(MediaError, match="not a readable audio file|not an audio file"):
        load_audio(tmp_path / "text.wav")
    with pytest.raises(MediaError, match="longer than 0.5 s"):
        load_audio(tmp_path / "ok.wav", max_seconds=0.5)


def test_mp4_roundtrip_keeps_audio_and_video_in_sync(tmp_path):
    fps, rate = 24, 16000
    frames = np.zeros((48, 32, 32, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.arange(48, dtype=np.uint8)[:, None, None] * 5
    with Mp4Writer(tmp_path / "clip.mp4", fps=fps, width=32, height=32, audio_rate=rate) as w:
        for i in range(2):
            w.write_frames(frames[i * 24:(i + 1) * 24])
            w.write_audio(np.full(rate, 0.25, dtype=np.float32))
    video, audio, got_fps, got_rate = read_mp4(tmp_path / "clip.mp4")
    assert video.shape == (48, 32, 32, 3) and got_fps == fps and got_rate == rate
    assert abs(len(audio) / rate - len(video) / fps) <= 1.0 / fps + 1024 / rate
    assert abs(int(video[40, 16, 16, 0]) - 200) < 12  # content survives the codec
    with pytest.raises(ValueError, match="uint8"):
        Mp4Writer(tmp_path / "x.mp4", 24, 32, 32).write_frames(np.zeros((1, 32, 32, 3), np.float32))
