"""Image loading and SigLIP preprocessing (LLaVA / Cambrian "pad" mode).

An image is padded to a square with the mean colour (``int(0.5 * 255) = 127`` per channel, as
LLaVA's ``expand2square``), centred; resized to ``image_size × image_size`` (bicubic, Pillow);
and normalised to [-1, 1] with SigLIP's mean = std = 0.5: ``(x / 255 - 0.5) / 0.5``.
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath
from PIL import Image

from gazejax.data.records import DataError

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
PAD_COLOR = tuple(int(m * 255) for m in SIGLIP_MEAN)


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` (local or cloud), converted to RGB.

    Raises:
      DataError: the file is missing, unreadable, truncated or not an image (``path`` is it).
    """
    try:
        with epath.Path(path).open("rb") as f, Image.open(f) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image: {exc}", path, kind="image") from exc


def pad_to_square(image: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """``image`` centred on a ``max(w, h)``-sided square of ``color`` (unchanged if square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess(image: Image.Image, image_size: int) -> np.ndarray:
    """SigLIP input of an RGB image: float32 ``[image_size, image_size, 3]`` in [-1, 1]."""
    square = pad_to_square(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = np.asarray(square, np.float32) / 255.0
    return (pixels - np.float32(SIGLIP_MEAN)) / np.float32(SIGLIP_STD)


def read_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """:func:`load_image` then :func:`preprocess`: float32 ``[image_size, image_size, 3]``."""
    return preprocess(load_image(path), image_size)
