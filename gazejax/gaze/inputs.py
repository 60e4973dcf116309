"""The packed model inputs: what packing produces and the multimodal model consumes."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from gazejax.gaze.geometry import PackingGeometry
from kernels.gaze_attention import RegionTable, TokenMeta


@flax.struct.dataclass
class MultimodalInputs:
    """A packed batch with static shapes (see :func:`gazejax.data.packing.pack_batch`).

    Attributes:
      input_ids: int32 ``[batch, length]`` token ids in storage order (any id on visual,
        context and padding slots).
      units: float ``[batch, max_units, height, width, 3]`` pixels of every image / frame
        (normalised as SigLIP expects); unused units are ignored.
      visual_index: int32 ``[batch, length]``: for a visual slot, ``unit * tokens_per_unit +
        raster index`` of its token within the sample's units; -1 elsewhere.
      context_index: int32 ``[batch, length]``: which context token (0..|C|-1) a context slot
        holds; -1 elsewhere.
      meta: :class:`TokenMeta` ``[batch, length]``.
      regions: :class:`RegionTable` ``[batch, num_regions]``.
    """

    input_ids: jax.Array
    units: jax.Array
    visual_index: jax.Array
    context_index: jax.Array
    meta: TokenMeta
    regions: RegionTable

    @classmethod
    def abstract(
        cls,
        geometry: PackingGeometry,
        batch: int,
        length: int,
        max_units: int,
        num_regions: int,
    ) -> MultimodalInputs:
        """Shapes and dtypes only (``jax.ShapeDtypeStruct``), e.g. for ``jax.eval_shape``."""
        size = geometry.image_size

        def ints(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.int32)

        return cls(
            input_ids=ints(batch, length),
            units=jax.ShapeDtypeStruct((batch, max_units, size, size, 3), jnp.float32),
            visual_index=ints(batch, length),
            context_index=ints(batch, length),
            meta=TokenMeta(*(ints(batch, length) for _ in range(4))),
            regions=RegionTable(
                *(ints(batch, num_regions) for _ in range(3)),
                capacity=geometry.region_capacity,
            ),
        )
