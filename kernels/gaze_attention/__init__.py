"""The gaze attention op (paper eq. 2–4; DESIGN.md §2–§4): its contract and implementations.

This package is the floor of the repository and imports nothing from ``gazejax``:

- ``metadata.py``: the token contract: :class:`TokenKind`, per-slot :class:`TokenMeta`, the
  :class:`RegionTable`, and the visibility rule (who sees whom).
- ``routing.py``: descriptors, scores and the exact top-K :class:`Selection`.
- ``dispatch.py``: :func:`gaze_attention`, which selects once and calls one
  ``attend_selected_*`` implementation: ``reference.py`` (the masked dense oracle), ``xla.py``
  (region-gather decode, blockwise many-query), ``pallas_decode.py`` and ``pallas_train.py``
  (Pallas kernels: Mosaic on TPU, Triton on GPU, the interpreter on CPU; ``platform.py``
  picks which); ``"auto"`` is Pallas on a GPU/TPU and xla on a CPU.
- ``sharded.py``: :func:`sharded_gaze_decode` (with any implementation) and
  :func:`sharded_dense_decode`, a decode step over a KV cache sharded along its sequence axis,
  and :func:`sharded_region_descriptors`, each shard's descriptors from its own keys.
"""

from kernels.gaze_attention.dispatch import (
    ATTEND_SELECTED,
    IMPLEMENTATIONS,
    gaze_attention,
    resolve_implementation,
)
from kernels.gaze_attention.metadata import (
    RegionTable,
    TokenKind,
    TokenMeta,
    region_table,
    visibility,
)
from kernels.gaze_attention.routing import (
    ROUTINGS,
    Routing,
    Selection,
    region_descriptors,
    routable,
    select_regions,
    validate_routing,
    validate_top_k,
)
from kernels.gaze_attention.sharded import (
    check_sharded_layout,
    sharded_dense_decode,
    sharded_gaze_decode,
    sharded_region_descriptors,
)

__all__ = [
    "ATTEND_SELECTED",
    "IMPLEMENTATIONS",
    "ROUTINGS",
    "RegionTable",
    "Routing",
    "Selection",
    "TokenKind",
    "TokenMeta",
    "check_sharded_layout",
    "gaze_attention",
    "region_descriptors",
    "region_table",
    "resolve_implementation",
    "routable",
    "select_regions",
    "sharded_dense_decode",
    "sharded_gaze_decode",
    "sharded_region_descriptors",
    "validate_routing",
    "validate_top_k",
    "visibility",
]
