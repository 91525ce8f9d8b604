"""Media in and out: images and audio with one-line errors, MP4 writing, bundled samples.

Names are imported lazily so that code needing only `livestage.media.samples` (benchmarks on a
GPU image without PyAV, say) does not pull in the codecs.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MediaError": "livestage.media.errors",
    "load_audio": "livestage.media.audio",
    "write_wav": "livestage.media.audio",
    "load_image": "livestage.media.image",
    "save_image": "livestage.media.image",
    "Mp4Writer": "livestage.media.mp4",
    "read_mp4": "livestage.media.mp4",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
