"""The projector: shapes, and the compression conv + MLP against torch."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from gazejax.models.projector import Projector, ProjectorConfig


def init(config: ProjectorConfig, x: np.ndarray, grid=None) -> dict:
    return nn.unbox(Projector(config).init(jax.random.key(0), x, grid)["params"])


def features(batch: int, tokens: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, tokens, width)).astype(np.float32)


@pytest.mark.parametrize(
    "compress,grid,tokens_out",
    [
        (False, None, 36),
        (True, None, 9),
        (True, (24, 24), 144),
        (True, (5, 7), 12),
        (False, (5, 7), 35),
    ],
)
def test_shapes(compress, grid, tokens_out):
    config = ProjectorConfig(vision_width=8, hidden_size=12, compress=compress)
    tokens = grid[0] * grid[1] if grid else 36
    x = features(2, tokens, 8)
    params = init(config, x, grid)
    y = Projector(config).apply({"params": params}, x, grid)
    assert y.shape == (2, tokens_out, 12)
    h, w = config.output_grid(grid or (6, 6))
    assert h * w == tokens_out


def test_matches_torch_conv_and_exact_gelu_mlp():
    config = ProjectorConfig(vision_width=8, hidden_size=12, compress=True)
    grid = (5, 6)
    x = features(2, 30, 8, seed=1)
    params = jax.tree.map(np.asarray, init(config, x, grid))
    rng = np.random.default_rng(2)
    params["compress"]["bias"] = rng.standard_normal(8).astype(np.float32)  # non-zero biases
    params["fc1"]["bias"] = rng.standard_normal(12).astype(np.float32)
    y = np.asarray(Projector(config).apply({"params": params}, x, grid))

    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    conv = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
    fc1, fc2 = torch.nn.Linear(8, 12), torch.nn.Linear(12, 12)
    with torch.no_grad():
        conv.weight.copy_(t(params["compress"]["kernel"].transpose(3, 2, 0, 1)))  # HWIO -> OIHW
        conv.bias.copy_(t(params["compress"]["bias"]))
        for lin, name in ((fc1, "fc1"), (fc2, "fc2")):
            lin.weight.copy_(t(params[name]["kernel"].T))
            lin.bias.copy_(t(params[name]["bias"]))
        z = conv(t(x).reshape(2, *grid, 8).permute(0, 3, 1, 2))  # [2, 8, 3, 3]
        assert z.shape[2:] == config.output_grid(grid) == (3, 3)
        z = z.flatten(2).transpose(1, 2)
        want = fc2(torch.nn.functional.gelu(fc1(z), approximate="none")).numpy()
    np.testing.assert_allclose(y, want, atol=1e-5)


def test_compression_conv_corner_against_numpy():
    """Output token (0, 0) sees input rows / cols 0..1 at kernel taps 1..2 (padding 1)."""
    config = ProjectorConfig(vision_width=4, hidden_size=4, compress=True)
    x = features(1, 16, 4, seed=3)
    params = init(config, x)
    kernel = np.asarray(params["compress"]["kernel"])
    grid = x.reshape(4, 4, 4)
    corner = np.einsum("hwc,hwco->o", grid[:2, :2], kernel[1:, 1:]) + params["compress"]["bias"]
    _, state = Projector(config).apply(
        {"params": params},
        x,
        capture_intermediates=lambda m, _: m.name == "compress",
        mutable=["intermediates"],
    )
    got = np.asarray(state["intermediates"]["compress"]["__call__"][0])
    np.testing.assert_allclose(got[0, 0, 0], corner, atol=1e-5)


def test_grid_errors_and_axis_names():
    config = ProjectorConfig(vision_width=4, hidden_size=6, compress=True)
    with pytest.raises(ValueError, match="not a square grid"):
        init(config, features(1, 12, 4))
    with pytest.raises(ValueError, match="does not hold"):
        init(config, features(1, 12, 4), (3, 5))
    specs = nn.get_partition_spec(Projector(config).init(jax.random.key(0), features(1, 16, 4)))[
        "params"
    ]
    assert tuple(specs["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["fc2"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["compress"]["kernel"]) == (
        "patch_height",
        "patch_width",
        "channels",
        "embed",
    )
