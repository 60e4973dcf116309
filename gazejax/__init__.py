"""gazejax: Gaze Attention for multimodal LLMs in JAX/Flax."""

__version__ = "0.1.0"
