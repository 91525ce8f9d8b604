"""Reference images: loaded, centre-cropped and resized to the model resolution, in [-1, 1].

Everything a user might upload is either turned into the RGB image they see in a viewer or
refused with a one-line `MediaError`: phone photos are rotated by their EXIF orientation,
transparency is flattened onto white, 16-bit and 32-bit integer images are scaled (not clipped)
to 8 bits, palette/greyscale/CMYK images are converted, and only the first frame of an animation
is used. Floating-point images are refused: their value range is not defined.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from livestage.media.errors import MediaError

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
"""Checked from the header before any pixel is decoded (a 4096x4096 RGB image is 48 MiB)."""
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
"""The formats accepted: PIL's other decoders (TIFF, PSD, EPS via Ghostscript, ...) are attack
surface a reference photo does not need."""

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Any supported PIL mode -> 8-bit RGB, as an image viewer would show it."""
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        arr = np.asarray(img).astype(np.float64)
        full = 65535.0 if img.mode in _SIXTEEN_BIT or arr.max(initial=0) <= 65535 else 2.0 ** 32 - 1
        arr = np.clip(arr, 0, full) / full * 255.0
        return Image.fromarray(np.round(arr).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        raise MediaError(f"{name}: unsupported image mode F (32-bit float); save it as 8-bit RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, size: tuple[int, int] | None = None, name: str = "image") -> torch.Tensor:
    """Encoded image bytes (PNG, JPEG or WebP) -> [3, H, W] float in [-1, 1].

    `size` is (height, width): the image is centre-cropped to that aspect ratio, then resized.
    `name` (a path, or a request field) starts every error message.
    """
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (height, width) with positive values, got {size}")
    if not data:
        raise MediaError(f"{name}: empty image (zero bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise MediaError(f"{name}: image is {len(data)} bytes, more than {MAX_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"{name}: image is {img.width}x{img.height}, more than "
                                 f"{MAX_IMAGE_PIXELS} pixels")
            img.seek(0)  # animations: the first frame
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img, name)
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(f"{name}: image is too large (more than {MAX_IMAGE_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not a readable image (PNG, JPEG or WebP)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(f"{name}: not a readable image ({type(exc).__name__})") from None
    if size is not None:
        rgb = _center_crop_resize(rgb, size)
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _center_crop_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crops the largest centred region with the target aspect ratio, then resizes (no distortion)."""
    height, width = size
    target = width / height
    w, h = img.size
    if w / h > target:
        new_w = max(1, int(round(h * target)))
        left = (w - new_w) // 2
        img = img.crop((left, 0, left + new_w, h))
    else:
        new_h = max(1, int(round(w / target)))
        top = (h - new_h) // 2
        img = img.crop((0, top, w, top + new_h))
    return img.resize((width, height), Image.BICUBIC)


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file -> [3, H, W] float in [-1, 1]; `size` = (height, width) crops and resizes."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: image file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"{path}: cannot read image file ({exc.strerror or type(exc).__name__})") from None
    return decode_image(data, size, name=str(path))


def save_image(path: str | Path, image: torch.Tensor) -> None:
    """Saves a [3, H, W] image in [-1, 1] (format from the file extension, e.g. .png)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    try:
        Image.fromarray(arr.permute(1, 2, 0).cpu().numpy()).save(str(path))
    except (ValueError, KeyError) as exc:  # PIL: unknown extension
        raise MediaError(f"{path}: cannot save image ({exc})") from None
