"""Any number of visual tokens as units a layout accepts (imported by the benchmark scripts,
which run from this folder)."""

from __future__ import annotations

from gazejax.gaze import VisualSegment

FRAME_SIDE, REGION_SIDE = 24, 6  # 24×24 frames (576 tokens), 6×6 regions


def visual_segments(n_visual: int) -> list[VisualSegment]:
    """``n_visual`` tokens as 24×24 frames plus, for a remainder, one more grid (the squarest
    with both sides >= 6, a region's side) or, where the remainder has none, two grids of 6 and
    7 rows (the remainder takes one frame with it when it is too small for that).

    Raises ValueError for ``n_visual < 36`` (less than one region) or a count below 108 that no
    grid of sides >= 6 holds exactly.
    """
    frame = FRAME_SIDE * FRAME_SIDE
    frames, rest = divmod(n_visual, frame)
    if rest and not _grid(rest) and rest < 108 and frames:
        frames, rest = frames - 1, rest + frame
    segments = [VisualSegment(FRAME_SIDE, FRAME_SIDE, frames)] if frames else []
    if not rest:
        return segments
    if grid := _grid(rest):
        return [*segments, VisualSegment(*grid)]
    for sixes in range(REGION_SIDE, rest // REGION_SIDE + 1):  # rest = 6·a + 7·b, a, b >= 6
        sevens, left = divmod(rest - REGION_SIDE * sixes, REGION_SIDE + 1)
        if not left and sevens >= REGION_SIDE:
            return [*segments, VisualSegment(6, sixes), VisualSegment(7, sevens)]
    raise ValueError(f"{n_visual} visual tokens: no grids of sides >= {REGION_SIDE} hold them")


def _grid(tokens: int) -> tuple[int, int] | None:
    """The squarest ``(height, width)``, ``REGION_SIDE <= height <= width``, of ``tokens``."""
    heights = [h for h in range(REGION_SIDE, int(tokens**0.5) + 1) if tokens % h == 0]
    return (heights[-1], tokens // heights[-1]) if heights else None
