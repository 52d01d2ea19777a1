"""Rendering a frame to JPEG/PNG (WADO-RS /rendered, /thumbnail, WADO-URI).

Compressed transfer syntaxes (JPEG, JPEG 2000, JPEG-LS, RLE) decode through the
pylibjpeg plugins pydicom finds on its own.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array

from medlake.errors import InvalidInput, NotFound, UnsupportedMediaType

MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG"}


@dataclass(frozen=True)
class RenderOptions:
    """What the client asked for: media type, window, viewport and quality."""

    media_type: str = "image/jpeg"
    window_center: float | None = None
    window_width: float | None = None
    viewport: tuple[int, int] | None = None
    quality: int = 90


def parse_window(value: str | None) -> tuple[float | None, float | None]:
    """``window=center,width[,function]`` (PS3.18 8.3.5.1.2) as (center, width)."""
    if not value:
        return None, None
    parts = value.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError) as exc:
        raise InvalidInput(f"window must be 'center,width', not {value!r}") from exc
    if width <= 0:
        raise InvalidInput(f"window width must be positive, not {width}")
    return center, width


def parse_viewport(value: str | None) -> tuple[int, int] | None:
    """``viewport=vw,vh`` as a (width, height) bound."""
    if not value:
        return None
    parts = value.split(",")
    try:
        width, height = int(parts[0]), int(parts[1])
    except (IndexError, ValueError) as exc:
        raise InvalidInput(f"viewport must be 'width,height', not {value!r}") from exc
    if not (0 < width <= 8192 and 0 < height <= 8192):
        raise InvalidInput(f"viewport {value!r} is out of range (1..8192)")
    return width, height


def render_frame(source: Any, frame: int, options: RenderOptions) -> bytes:
    """Render frame ``frame`` (1-based) of the Part-10 file ``source`` (path or file)."""
    if options.media_type not in MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"cannot render to {options.media_type}; supported: {', '.join(MEDIA_TYPES)}"
        )
    ds = pydicom.dcmread(source)
    if "PixelData" not in ds:
        raise NotFound("the instance has no pixel data to render")
    frames = int(ds.get("NumberOfFrames") or 1)
    if not 1 <= frame <= frames:
        raise NotFound(f"frame {frame} does not exist (the instance has {frames})")
    try:
        pixels = ds.pixel_array if frames == 1 else pixel_array(ds, index=frame - 1)
    except Exception as exc:  # a codec problem is the data's, not the server's
        raise UnsupportedMediaType(
            f"cannot decode pixel data ({ds.file_meta.TransferSyntaxUID}): {exc}"
        ) from exc
    image = _to_image(ds, np.asarray(pixels), options)
    if options.viewport:
        image.thumbnail(options.viewport)
    out = io.BytesIO()
    fmt = MEDIA_TYPES[options.media_type]
    if fmt == "JPEG":
        image.save(out, fmt, quality=options.quality)
    else:
        image.save(out, fmt)
    return out.getvalue()


def _to_image(
    ds: pydicom.Dataset, pixels: np.ndarray[Any, Any], options: RenderOptions
) -> Image.Image:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        return Image.fromarray(_to_uint8(pixels.astype(np.float64)), "RGB")
    data = apply_modality_lut(pixels, ds).astype(np.float64)
    if options.window_center is not None and options.window_width is not None:
        low = options.window_center - options.window_width / 2
        high = options.window_center + options.window_width / 2
        data = np.clip((data - low) / (high - low), 0, 1) * 255
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        data = apply_voi_lut(data, ds)
        data = _to_uint8(data)
    else:
        data = _to_uint8(data)
    if photometric == "MONOCHROME1":
        data = 255 - data
    return Image.fromarray(data.astype(np.uint8), "L")


def _to_uint8(data: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    low, high = float(data.min()), float(data.max())
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)
    return ((data - low) / (high - low) * 255).astype(np.uint8)
