"""Settings from LIVESTAGE_* environment variables; bad values fail naming the variable."""

from __future__ import annotations

import pytest

from livestage.config import Settings, SettingsError, env_name, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("LIVESTAGE_"):
            monkeypatch.delenv(key)


def test_settings_come_from_env(monkeypatch):
    monkeypatch.setenv("LIVESTAGE_LOOKAHEAD_CHUNKS", "3")
    monkeypatch.setenv("LIVESTAGE_PRESET", "demo")
    monkeypatch.setenv("LIVESTAGE_NATS_URL", "nats://nats:4222")
    monkeypatch.setenv("LIVESTAGE_HEARTBEAT_INTERVAL_S", "0.25")
    monkeypatch.setenv("LIVESTAGE_LOG_LEVEL", "debug")
    monkeypatch.setenv("LIVESTAGE_MAX_PAYLOAD", "1048576")
    monkeypatch.setenv("LIVESTAGE_ALLOW_SEEDED_WEIGHTS", "false")
    s = load_settings(Settings)
    assert (s.lookahead_chunks, s.preset, s.nats_url) == (3, "demo", "nats://nats:4222")
    assert s.heartbeat_interval_s == 0.25 and s.log_level == "DEBUG" and s.max_payload == 1 << 20
    assert s.allow_seeded_weights is False
    assert load_settings(Settings, preset="tiny").preset == "tiny"  # overrides win
    assert Settings().session_ttl_s == 3600 and Settings().redis_url.startswith("redis://")


def test_bad_value_error_names_the_variable_and_value(monkeypatch):
    monkeypatch.setenv("LIVESTAGE_CAPACITY", "many")
    with pytest.raises(SettingsError, match=r"LIVESTAGE_CAPACITY='many'") as info:
        load_settings(Settings)
    assert info.value.variables == ["LIVESTAGE_CAPACITY"]
    monkeypatch.setenv("LIVESTAGE_CAPACITY", "2")
    monkeypatch.setenv("LIVESTAGE_GRPC_PORT", "70000")
    monkeypatch.setenv("LIVESTAGE_LOG_LEVEL", "chatty")
    with pytest.raises(SettingsError) as info:
        load_settings(Settings)
    assert sorted(info.value.variables) == ["LIVESTAGE_GRPC_PORT", "LIVESTAGE_LOG_LEVEL"]
    assert "LIVESTAGE_GRPC_PORT='70000'" in str(info.value)


def test_inconsistent_values_name_both_variables(monkeypatch):
    monkeypatch.setenv("LIVESTAGE_HEARTBEAT_INTERVAL_S", "5")
    monkeypatch.setenv("LIVESTAGE_HEARTBEAT_TTL_S", "2")
    with pytest.raises(SettingsError, match="LIVESTAGE_HEARTBEAT_TTL_S.*LIVESTAGE_HEARTBEAT_INTERVAL_S") as info:
        load_settings(Settings)
    assert set(info.value.variables) == {"LIVESTAGE_HEARTBEAT_TTL_S", "LIVESTAGE_HEARTBEAT_INTERVAL_S"}


def test_services_subclass_with_their_own_fields(monkeypatch):
    class PublisherSettings(Settings):
        recordings_dir: str = "/tmp/recordings"
        video_fps: int = 24

    monkeypatch.setenv("LIVESTAGE_VIDEO_FPS", "25")
    monkeypatch.setenv("LIVESTAGE_PRESET", "demo")
    s = load_settings(PublisherSettings)
    assert (s.video_fps, s.preset, s.recordings_dir) == (25, "demo", "/tmp/recordings")
    assert env_name("video_fps", PublisherSettings) == "LIVESTAGE_VIDEO_FPS"
    monkeypatch.setenv("LIVESTAGE_VIDEO_FPS", "fast")
    with pytest.raises(SettingsError, match="LIVESTAGE_VIDEO_FPS"):
        load_settings(PublisherSettings)


def test_livekit_needs_its_keys_and_viewers_get_the_public_url(monkeypatch):
    monkeypatch.setenv("LIVESTAGE_LIVEKIT_URL", "ws://livekit:7880")
    with pytest.raises(SettingsError, match="LIVESTAGE_LIVEKIT_API_KEY") as info:
        load_settings(Settings)
    assert "LIVESTAGE_LIVEKIT_URL" in info.value.variables
    monkeypatch.setenv("LIVESTAGE_LIVEKIT_API_KEY", "devkey")
    monkeypatch.setenv("LIVESTAGE_LIVEKIT_API_SECRET", "s" * 32)
    assert load_settings(Settings).viewer_livekit_url == "ws://livekit:7880"
    monkeypatch.setenv("LIVESTAGE_LIVEKIT_PUBLIC_URL", "ws://localhost:7880")
    assert load_settings(Settings).viewer_livekit_url == "ws://localhost:7880"
