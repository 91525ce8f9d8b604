"""The browser playground (see `app.py`): watch a session and talk to it from a web page."""

from livestage.playground.app import Playground, PlaygroundSettings, create_app, encode_chunk, run_playground

__all__ = ["Playground", "PlaygroundSettings", "create_app", "encode_chunk", "run_playground"]
