"""lmms-eval integration: gazejax checkpoints as the lmms-eval model ``gazejax``.

lmms-eval finds the model through the entry point ``lmms_eval.models: gazejax`` (pyproject.toml),
which calls :func:`manifest`; the model class, :class:`gazejax.lmms.model.GazeJaxLMM`, is only
imported when a run asks for ``--model gazejax``, so this module stays cheap to import::

    python -m lmms_eval --model gazejax \\
        --model_args workdir=runs/gaze_default,attention=gaze,budget=0.22 \\
        --tasks mme --batch_size 8 --output_path out/
"""

from __future__ import annotations

MODEL_ID = "gazejax"
MODEL_CLASS = "gazejax.lmms.model.GazeJaxLMM"


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's ``ModelManifest`` for ``gazejax``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
