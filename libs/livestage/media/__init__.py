"""Media in and out: images and audio with one-line errors, MP4 writing, bundled samples."""

from livestage.media.audio import load_audio, write_wav
from livestage.media.errors import MediaError
from livestage.media.image import load_image, save_image
from livestage.media.mp4 import Mp4Writer, read_mp4

__all__ = ["MediaError", "Mp4Writer", "load_audio", "load_image", "read_mp4", "save_image", "write_wav"]
