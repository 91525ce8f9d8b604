"""Settings from the environment and JSON logs with session context."""

from __future__ import annotations

import json

import pytest

from livestage.config import Settings, SettingsError, load_settings
from livestage.observability import bind_session, configure_logging, get_logger
from livestage.observability.tracing import configure_tracing, tracer


def test_settings_come_from_env_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("LIVESTAGE_LOOKAHEAD_CHUNKS", "3")
    monkeypatch.setenv("LIVESTAGE_PRESET", "demo")
    s = load_settings(Settings)
    assert s.lookahead_chunks == 3 and s.preset == "demo"
    monkeypatch.setenv("LIVESTAGE_CAPACITY", "many")
    with pytest.raises(SettingsError, match="LIVESTAGE_CAPACITY"):
        load_settings(Settings)


def test_logs_are_json_with_session_chunk_and_trace(capsys):
    configure_tracing("unit")
    configure_logging("unit", "INFO")
    log = get_logger("t")
    with tracer().start_as_current_span("span"):
        with bind_session("sess-1", chunk=4):
            log.info("chunk_done", ms=12.5)
    line = [ln for ln in capsys.readouterr().out.splitlines() if "chunk_done" in ln][-1]
    rec = json.loads(line)
    assert rec["session_id"] == "sess-1" and rec["chunk"] == 4 and rec["service"] == "unit"
    assert len(rec["trace_id"]) == 32 and rec["level"] == "info"
