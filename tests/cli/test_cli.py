"""The `livestage` command: render from files, bad inputs give one-line errors, parity verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from livestage.media import read_mp4, write_wav

SHARED = Path(__file__).resolve().parents[3] / "shared" / "parity"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livestage.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.fixture
def inputs(tmp_path):
    Image.new("RGB", (64, 64), (200, 150, 120)).save(tmp_path / "face.png")
    t = np.arange(int(2.5 * 16000)) / 16000
    write_wav(tmp_path / "speech.wav", 0.3 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 3 * t) > 0))
    write_wav(tmp_path / "user.wav", 0.2 * np.sin(2 * np.pi * 300 * t[:16000]))
    return tmp_path


def test_render_writes_mp4_with_muxed_audio_and_a_json_line_per_chunk(inputs):
    out = inputs / "clip.mp4"
    r = _cli("render", "--preset", "tiny", "--image", str(inputs / "face.png"), "--speak",
             str(inputs / "speech.wav"), "--listen", str(inputs / "user.wav"),
             "--directive-at", "1:smile", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    chunks = [line for line in lines if "chunk" in line]
    assert [c["chunk"] for c in chunks] == [0, 1, 2]
    assert all(c["total_ms"] > 0 and {"encode_ms", "generate_ms", "refine_ms", "decode_ms"} <= set(c)
               for c in chunks)
    assert chunks[1]["directive"] == "smile"
    done = lines[-1]
    assert done["event"] == "done" and done["seeded_weights"] is True
    video, audio, fps, rate = read_mp4(out)
    assert video.shape == (24, 32, 32, 3) and fps == 8
    assert abs(len(audio) / rate - 3.0) < 0.15 and np.abs(audio).max() > 0.1


@pytest.mark.parametrize("case,needle", [
    ("missing_image", "image file not found"),
    ("corrupt_image", "not a readable image"),
    ("non_audio", "not"),
    ("wrong_rate", "sample rate is 44100 Hz, expected 16000 Hz"),
    ("zero_length", "zero-length"),
])
def test_bad_inputs_give_one_line_errors_and_nonzero_exit(inputs, case, needle):
    image, speak = inputs / "face.png", inputs / "speech.wav"
    if case == "missing_image":
        image = inputs / "missing.png"
    elif case == "corrupt_image":
        image = inputs / "corrupt.png"
        image.write_bytes(b"\xff\xd8\xff garbage")
    elif case == "non_audio":
        speak = inputs / "face.png"
    elif case == "wrong_rate":
        speak = inputs / "44k.wav"
        write_wav(speak, np.zeros(44100), 44100)
    elif case == "zero_length":
        speak = inputs / "empty.wav"
        write_wav(speak, np.zeros(0), 16000)
    r = _cli("render", "--preset", "tiny", "--image", str(image), "--speak", str(speak),
             "--out", str(inputs / "x.mp4"))
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("livestage: error:") and needle in err
    assert not (inputs / "x.mp4").exists()


@pytest.mark.skipif(not SHARED.exists(), reason="shared parity cases not present")
@pytest.mark.parametrize("name", ["wan_dit_a", "wan_vae_a"])
def test_checkpoint_verify_passes_on_the_shared_reference_cases(name):
    r = _cli("checkpoint", "verify", str(SHARED / f"{name}.safetensors"))
    assert r.returncode == 0, r.stdout + r.stderr
    errors = [float(line.split("max relative error ")[1].split()[0])
              for line in r.stdout.splitlines() if "max relative error" in line]
    assert errors and max(errors) < 1e-4


def test_checkpoint_verify_fails_on_a_tampered_archive(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    src = SHARED / "wan_dit_a.safetensors"
    if not src.exists():
        pytest.skip("shared parity cases not present")
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["output.y"] = tensors["output.y"] * 1.01
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    r = _cli("checkpoint", "verify", str(tmp_path / "bad.safetensors"))
    assert r.returncode == 1 and "FAIL" in r.stdout
    tensors.pop("weights.head.head.weight")
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
    r = _cli("checkpoint", "verify", str(tmp_path / "missing.safetensors"))
    assert r.returncode == 2 and "missing key 'head.head.weight'" in r.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    r = _cli("checkpoint", "verify", str(tmp_path / "junk.safetensors"))
    assert r.returncode == 2 and "cannot read" in r.stderr
