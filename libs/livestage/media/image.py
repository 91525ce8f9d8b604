"""Reference images: loaded, centre-cropped and resized to the model resolution, in [-1, 1]."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from livestage.media.errors import MediaError

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 8192 * 8192


def decode_image(data: bytes, size: tuple[int, int] | None = None, name: str = "image") -> torch.Tensor:
    """Encoded image bytes (PNG, JPEG, WebP...) -> [3, H, W] float in [-1, 1]."""
    if not data:
        raise MediaError(f"{name}: empty image")
    if len(data) > MAX_IMAGE_BYTES:
        raise MediaError(f"{name}: image is {len(data)} bytes, more than {MAX_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"{name}: image is {img.width}x{img.height}, too large")
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, MediaError):
            raise
        raise MediaError(f"{name}: not a readable image ({type(exc).__name__})") from None
    if size is not None:
        rgb = _center_crop_resize(rgb, size)
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _center_crop_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    height, width = size
    target = width / height
    w, h = img.size
    if w / h > target:
        new_w = int(round(h * target))
        left = (w - new_w) // 2
        img = img.crop((left, 0, left + new_w, h))
    else:
        new_h = int(round(w / target))
        top = (h - new_h) // 2
        img = img.crop((0, top, w, top + new_h))
    return img.resize((width, height), Image.BICUBIC)


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: image file not found")
    return decode_image(path.read_bytes(), size, name=str(path))


def save_image(path: str | Path, image: torch.Tensor) -> None:
    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    Image.fromarray(arr.permute(1, 2, 0).cpu().numpy()).save(str(path))
