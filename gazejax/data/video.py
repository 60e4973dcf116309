"""Video decoding (PyAV) and frame sampling: 1 FPS, uniformly subsampled to ``max_frames``.

Sampling follows Cambrian-S / LLaVA-Video: timestamps ``0, 1/fps, 2/fps, ...`` before the end of
the clip (at least one), and when there are more than ``max_frames`` of them, ``max_frames``
uniformly spaced ones (first and last kept). Each timestamp takes the first decoded frame at or
after it (the last frame for a timestamp past the end). A folder of frames (image files, in
natural order: ``f2.jpg`` before ``f10.jpg``) counts as already sampled at ``fps``: only the
uniform subsampling applies. Every frame is preprocessed as an image
(:func:`gazejax.data.images.preprocess`).
"""

from __future__ import annotations

import contextlib
import fractions
import os
import re
from collections.abc import Iterator

import av
import numpy as np
from etils import epath

from gazejax.data.images import load_image, preprocess
from gazejax.data.records import DataError
from gazejax.paths import is_local

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SEEK_GAP_S = 4.0
"""Seek (to the keyframe before the next timestamp) instead of decoding on, past this gap."""


def uniform_indices(count: int, max_frames: int) -> np.ndarray:
    """int ``[min(count, max_frames)]``: all of ``range(count)``, or ``max_frames`` evenly spaced
    indices from the first to the last (rounded)."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if count <= max_frames:
        return np.arange(count)
    return np.round(np.linspace(0, count - 1, max_frames)).astype(np.int64)


def sample_times(duration: float, max_frames: int, fps: float = 1.0) -> np.ndarray:
    """float64 ``[T]`` seconds, ``1 <= T <= max_frames``: ``k / fps`` for ``k / fps < duration``,
    uniformly subsampled (:func:`uniform_indices`)."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    count = max(1, int(np.ceil(duration * fps - 1e-6)))
    return uniform_indices(count, max_frames) / fps


def read_video(
    path: str | os.PathLike, *, image_size: int, max_frames: int, fps: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Sampled, preprocessed frames of a video file or a folder of frames (local or cloud).

    Returns:
      frames: float32 ``[T, image_size, image_size, 3]`` in [-1, 1], ``1 <= T <= max_frames``.
      times: float64 ``[T]``, each frame's time in seconds from the start of the clip.

    Raises:
      ValueError: ``max_frames < 1`` or ``fps <= 0``.
      DataError: the file or folder is missing, unreadable, has no video stream or no frames
        (``path`` is it).
    """
    if max_frames < 1 or fps <= 0:  # setup errors, not data errors
        raise ValueError(f"need max_frames >= 1 and fps > 0, got {max_frames} and {fps}")
    path = epath.Path(path)
    if path.is_dir():
        files = sorted(
            (p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key
        )
        if not files:
            raise DataError(
                f"no frames ({', '.join(FRAME_SUFFIXES)}) in the folder", path, kind="video"
            )
        index = uniform_indices(len(files), max_frames)
        frames = [preprocess(load_image(files[i]), image_size) for i in index]
        return np.stack(frames), index / fps
    try:
        with contextlib.ExitStack() as stack:  # PyAV reads a cloud file through a file object
            source = str(path) if is_local(path) else stack.enter_context(path.open("rb"))
            container = stack.enter_context(av.open(source))
            if not container.streams.video:
                raise DataError("no video stream", path, kind="video")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            times = sample_times(_duration(container, stream), max_frames, fps)
            frames, times = zip(
                *(
                    (preprocess(frame.to_image(), image_size), time)
                    for frame, time in _frames_at(container, stream, times)
                ),
                strict=True,
            )
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode video: {exc}", path, kind="video") from exc
    return np.stack(frames), np.asarray(times, np.float64)


def _natural_key(path: epath.Path) -> list[int | str]:
    """Sort key that orders the digit runs of a name as numbers: ``f2`` before ``f10``."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def _duration(container: av.container.InputContainer, stream: av.VideoStream) -> float:
    """The stream's duration in seconds: from its header, the container's, or its packets."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    end = max(
        (p.pts + (p.duration or 0) for p in container.demux(stream) if p.pts is not None), default=0
    )
    container.seek(0)
    return float((end - (stream.start_time or 0)) * stream.time_base)


def _frames_at(
    container: av.container.InputContainer, stream: av.VideoStream, times: np.ndarray
) -> Iterator[tuple[av.VideoFrame, float]]:
    """Yields ``(frame, its time)`` for each of the sorted ``times`` (seconds from the start)."""
    time_base = stream.time_base or fractions.Fraction(1, av.time_base)
    start = stream.start_time or 0
    frames, last, last_time = None, None, 0.0
    for t in times:
        if frames is None or t - last_time > SEEK_GAP_S:
            if frames is not None:
                container.seek(start + int(t / time_base), stream=stream)
            frames, last = container.decode(stream), None
        while last is None or last_time < t - 1e-6:
            frame = next(frames, None)
            if frame is None:
                break
            if frame.pts is None:
                raise ValueError("decoded frames have no timestamps (a raw stream?)")
            last, last_time = frame, float((frame.pts - start) * time_base)
        if last is None:
            raise ValueError(f"no frame decoded at {t:.3f} s")
        yield last, last_time
