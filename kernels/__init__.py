"""Attention kernels of gazejax: the gaze attention op and its implementations."""
