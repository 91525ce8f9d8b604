"""Media input errors are one line and name the file; decoding is faithful; MP4 output stays in sync."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from livestage.media import MediaError, Mp4Writer, load_audio, load_image, read_mp4, save_image, write_wav

RATE = 16000


def _one_line(exc: pytest.ExceptionInfo, path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    return msg


# -- images ---------------------------------------------------------------------------------------

def test_image_is_centre_cropped_resized_and_scaled_to_minus_one_one(tmp_path):
    img = Image.new("RGB", (300, 100), (0, 0, 255))  # blue edges, red centre square
    img.paste((255, 0, 0), (100, 0, 200, 100))
    img.save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", (32, 32))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert float(out[0].min()) > 0.95 and float(out[2].max()) < -0.95  # only the red centre is left
    tall = load_image(tmp_path / "wide.png", (16, 48))  # (height, width)
    assert tall.shape == (3, 16, 48)
    full = load_image(tmp_path / "wide.png")
    assert full.shape == (3, 100, 300) and float(full.min()) == -1.0 and float(full.max()) == 1.0


@pytest.mark.parametrize("case,needle", [
    ("missing", "image file not found"),
    ("corrupt", "not a readable image"),
    ("truncated", "not a readable image"),
    ("empty", "empty image"),
    ("float", "(PNG, JPEG or WebP)"),  # a 32-bit float TIFF: refused by its format
])
def test_bad_images_are_one_line_media_errors(tmp_path, case, needle):
    path = tmp_path / f"{case}.png"
    if case == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    elif case == "truncated":
        Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "whole.png")
        path.write_bytes((tmp_path / "whole.png").read_bytes()[:80])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "float":
        path = tmp_path / "float.tiff"
        Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(path)
    with pytest.raises(MediaError, match=needle) as exc:
        load_image(path, (16, 16))
    _one_line(exc, path)
    assert isinstance(exc.value, ValueError)


def test_image_modes_are_converted_as_a_viewer_shows_them(tmp_path):
    Image.new("L", (8, 8), 255).save(tmp_path / "grey.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # fully transparent
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 255, 0] + [0] * 765)
    pal.save(tmp_path / "pal.png")
    assert torch.all(load_image(tmp_path / "grey.png") == 1.0)
    assert torch.all(load_image(tmp_path / "clear.png") == 1.0)  # flattened onto white
    deep = load_image(tmp_path / "deep.png")
    assert deep.shape == (3, 8, 8) and float(deep.abs().max()) < 0.01  # mid-grey, not clipped to white
    assert load_image(tmp_path / "pal.png")[:, 0, 0].tolist() == [-1.0, 1.0, -1.0]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a portrait phone photo
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "phone.jpg").shape == (3, 40, 20)


def test_save_image_round_trips(tmp_path):
    x = torch.linspace(-1, 1, 3 * 8 * 8).reshape(3, 8, 8)
    save_image(tmp_path / "x.png", x)
    back = load_image(tmp_path / "x.png")
    assert float((back - x).abs().max()) <= 1 / 127.5
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        save_image(tmp_path / "y.png", torch.zeros(8, 8))


# -- audio ----------------------------------------------------------------------------------------

def _sine(seconds: float, hz: float, rate: int = RATE, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def _dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / rate)[spectrum.argmax()])


def _encode(path, codec: str, fmt: str, samples: np.ndarray, rate: int) -> None:
    """Writes stereo audio (same signal both sides) with PyAV, whatever the codec's sample format."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.stack([samples, samples]), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_wav_loads_exactly_as_mono_float32(tmp_path):
    x = _sine(1.0, 220)
    write_wav(tmp_path / "ok.wav", x, RATE)
    y = load_audio(tmp_path / "ok.wav", RATE)
    assert y.dtype == np.float32 and y.shape == (RATE,)
    assert float(np.abs(y - x).max()) < 1.5 / 32768  # 16-bit quantisation only


def test_compressed_formats_decode(tmp_path):
    x = _sine(1.0, 440)
    _encode(tmp_path / "a.flac", "flac", "flac", x, RATE)
    flac = load_audio(tmp_path / "a.flac", RATE)
    assert flac.shape == (RATE,) and float(np.abs(flac - x).max()) < 1e-3  # lossless (16-bit)
    _encode(tmp_path / "a.mp3", "libmp3lame", "mp3", x, RATE)
    mp3 = load_audio(tmp_path / "a.mp3", RATE)
    assert abs(mp3.size - RATE) < 1200 and abs(_dominant_hz(mp3, RATE) - 440) < 5
    assert 0.3 < float(np.sqrt(np.mean(mp3 ** 2))) < 0.4  # ~0.5/sqrt(2)


def test_stereo_is_averaged_to_mono(tmp_path):
    frames = np.stack([np.full(1600, 0.5), np.full(1600, 0.3)], axis=1)  # [n, 2]: L=0.5, R=0.3
    write_wav(tmp_path / "stereo.wav", frames, RATE)
    y = load_audio(tmp_path / "stereo.wav")
    assert y.shape == (1600,) and np.allclose(y, 0.4, atol=1e-4)
    opposite = np.stack([np.full(1600, 0.5), np.full(1600, -0.5)], axis=1)
    write_wav(tmp_path / "opposite.wav", opposite.reshape(-1), RATE, channels=2)  # interleaved
    assert np.abs(load_audio(tmp_path / "opposite.wav")).max() < 1e-3


def test_wrong_sample_rate_is_an_error_unless_resampling_is_asked_for(tmp_path):
    write_wav(tmp_path / "44k.wav", _sine(1.0, 1000, 44100), 44100)
    with pytest.raises(MediaError) as exc:
        load_audio(tmp_path / "44k.wav", RATE)
    msg = _one_line(exc, tmp_path / "44k.wav")
    assert "sample rate is 44100 Hz, expected 16000 Hz" in msg and "resample" in msg
    y = load_audio(tmp_path / "44k.wav", RATE, resample=True)
    assert y.shape == (RATE,) and abs(_dominant_hz(y, RATE) - 1000) < 2
    write_wav(tmp_path / "high.wav", _sine(1.0, 10000, 44100), 44100)  # above 8 kHz Nyquist
    alias = load_audio(tmp_path / "high.wav", RATE, resample=True)
    assert float(np.sqrt(np.mean(alias[500:-500] ** 2))) < 0.01  # filtered, not folded to 6 kHz


@pytest.mark.parametrize("case,needle", [
    ("missing", "audio file not found"),
    ("zero_bytes", "empty file"),
    ("zero_length", "zero-length"),
    ("png", "not an audio file"),
    ("text", "not a readable audio file"),
    ("too_long", "longer than 0.5 s"),
])
def test_bad_audio_is_a_one_line_media_error(tmp_path, case, needle):
    path = tmp_path / f"{case}.wav"
    max_seconds = None
    if case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "zero_length":
        write_wav(path, np.zeros(0), RATE)
    elif case == "png":
        path = tmp_path / "picture.png"
        Image.new("RGB", (8, 8)).save(path)
    elif case == "text":
        path.write_text("this is not audio, just text pretending to be a wav file\n" * 4)
    elif case == "too_long":
        write_wav(path, _sine(1.0, 220), RATE)
        max_seconds = 0.5
    with pytest.raises(MediaError, match=needle) as exc:
        load_audio(path, RATE, max_seconds=max_seconds)
    _one_line(exc, path)


def test_write_wav_validates_its_input(tmp_path):
    with pytest.raises(ValueError, match="channels"):
        write_wav(tmp_path / "x.wav", np.zeros(5), RATE, channels=2)
    with pytest.raises(ValueError, match="shape"):
        write_wav(tmp_path / "x.wav", np.zeros((2, 2, 2)), RATE)


# -- MP4 ------------------------------------------------------------------------------------------

def test_mp4_round_trip_keeps_frames_and_audio_in_sync(tmp_path):
    fps, size = 24, 32
    frames = np.zeros((48, size, size, 3), dtype=np.uint8)
    frames[30:] = 220  # the screen turns bright at frame 30 = 1.25 s ...
    audio = np.zeros(2 * RATE, dtype=np.float32)
    audio[int(1.25 * RATE):] = _sine(0.75, 500)  # ... exactly when a tone starts
    with Mp4Writer(tmp_path / "clip.mp4", fps=fps, width=size, height=size, audio_rate=RATE) as w:
        for i in range(2):  # two 1-s chunks, audio written in uneven pieces
            w.write_frames(frames[i * 24:(i + 1) * 24])
            chunk = audio[i * RATE:(i + 1) * RATE]
            w.write_audio(chunk[:5000])
            w.write_audio(chunk[5000:])
        assert w.video_seconds == 2.0 and w.audio_seconds == 2.0
    video, got, got_fps, got_rate = read_mp4(tmp_path / "clip.mp4")
    assert video.shape == (48, size, size, 3) and got_fps == fps and got_rate == RATE
    assert abs(len(got) / RATE - len(video) / fps) <= 1 / fps  # durations within one frame
    bright = int(np.argmax(video[:, :, :, 0].mean(axis=(1, 2)) > 110))
    loud = np.sqrt(np.convolve(got ** 2, np.ones(160) / 160, mode="same"))
    onset = int(np.argmax(loud > 0.1)) / RATE
    assert bright == 30 and abs(onset - bright / fps) <= 1 / fps  # in sync within one frame
    assert abs(int(video[10, 16, 16, 0]) - 0) < 12 and abs(int(video[40, 16, 16, 0]) - 220) < 12


def test_mp4_writer_rejects_wrong_frames_and_writes_after_close(tmp_path):
    with pytest.raises(ValueError, match="even width and height"):
        Mp4Writer(tmp_path / "odd.mp4", 24, 33, 32)
    w = Mp4Writer(tmp_path / "x.mp4", 24, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        w.write_frames(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="64x32, the writer is 32x32"):
        w.write_frames(np.zeros((1, 32, 64, 3), np.uint8))
    w.write_frames(np.zeros((32, 32, 3), np.uint8))  # one frame without the T axis
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.write_audio(np.zeros(10, np.float32))
    assert read_mp4(tmp_path / "x.mp4")[0].shape == (1, 32, 32, 3)
    with pytest.raises(MediaError, match="video file not found"):
        read_mp4(tmp_path / "missing.mp4")
