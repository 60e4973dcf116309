"""Flax Linen models: SigLIP ViT, projector, Qwen decoder."""
