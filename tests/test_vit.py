"""The SigLIP ViT on its own: variants, intermediates, scan / remat / penultimate equivalences,
position-embedding resampling and logical axis names. (HF parity: test_convert_siglip.py.)"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gazejax.models.vit import VisionTransformer, ViTConfig, resample_posemb, vit_config
from gazejax.sharding import DEFAULT_LOGICAL_AXIS_RULES, make_mesh

CONFIG = vit_config("mu/4", pool="map")  # width 32, depth 2, 2 heads, patch 4, 16 px


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def params(pixels) -> dict:
    variables = jax.jit(VisionTransformer(CONFIG).init)(jax.random.key(1), pixels)
    return nn.unbox(variables["params"])


def run(config: ViTConfig, params: dict, pixels: np.ndarray) -> tuple[np.ndarray, dict]:
    out, state = VisionTransformer(config).apply(
        {"params": params}, pixels, mutable=["intermediates"]
    )
    return np.asarray(out), state["intermediates"]


def stack_layers(params: dict, depth: int) -> dict:
    """``layers_{i}`` subtrees -> one ``layers`` subtree with a leading block axis."""
    blocks = [params[f"layers_{i}"] for i in range(depth)]
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, "layers": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}


def layer_norm(x: np.ndarray, p: dict, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def test_variants():
    so400m = vit_config("So400m/16")
    assert (so400m.width, so400m.depth, so400m.mlp_dim, so400m.num_heads) == (1152, 27, 4304, 16)
    assert (so400m.patch_size, so400m.grid, so400m.head_dim) == (16, 24, 72)
    assert vit_config("So400m/14").patch_size == 14
    assert vit_config("L/16", image_size=384).grid == 24
    shapes = jax.eval_shape(
        VisionTransformer(dataclasses.replace(so400m, scan=True)).init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 384, 384, 3), jnp.float32),
    )
    shapes = nn.unbox(shapes["params"])
    assert shapes["embedding"]["kernel"].shape == (16, 16, 3, 1152)
    assert shapes["pos_embedding"].shape == (576, 1152)
    assert shapes["layers"]["attn"]["query"]["kernel"].shape == (27, 1152, 16, 72)
    assert shapes["layers"]["mlp"]["fc1"]["kernel"].shape == (27, 1152, 4304)
    with pytest.raises(ValueError, match="unknown ViT variant"):
        vit_config("Q/16")
    with pytest.raises(ValueError, match="output"):
        vit_config("mu/4", output="first")
    with pytest.raises(ValueError, match=r"block count in \[0, 2\]"):
        vit_config("mu/4", output=3)
    with pytest.raises(ValueError, match="pool"):
        vit_config("mu/4", pool="gap")


def test_output_is_final_norm_of_sown_features(params, pixels):
    out, inter = run(CONFIG, params, pixels)
    assert out.shape == (2, 16, 32)
    encoded = np.asarray(inter["encoded"][0])
    np.testing.assert_array_equal(encoded, inter["layers_1"]["out"][0])
    np.testing.assert_allclose(out, layer_norm(encoded, params["norm"], 1e-6), atol=1e-5)
    assert inter["pooled"][0].shape == (2, 32)


def test_patch_and_position_embedding(params, pixels):
    """``embedded`` = conv over 4x4 patches (numpy) + the stored position embedding."""
    _, inter = run(CONFIG, params, pixels)
    patches = pixels.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
    kernel = np.asarray(params["embedding"]["kernel"]).reshape(48, 32)
    expected = patches @ kernel + params["embedding"]["bias"] + params["pos_embedding"]
    np.testing.assert_allclose(inter["embedded"][0], expected, atol=1e-5)


@pytest.mark.parametrize("old,new", [((4, 4), (6, 5)), ((6, 6), (3, 4))])
def test_resample_posemb_matches_torch_bilinear(old, new):
    posemb = np.random.default_rng(2).standard_normal((old[0] * old[1], 8)).astype(np.float32)
    grid = torch.from_numpy(posemb.reshape(1, *old, 8)).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=new, mode="bilinear", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    np.testing.assert_allclose(resample_posemb(jnp.asarray(posemb), old, new), want, atol=1e-6)
    assert resample_posemb(posemb, old, old) is posemb


def test_other_resolution_resamples_position_embedding(params):
    pixels = np.random.default_rng(3).uniform(-1, 1, (1, 24, 20, 3)).astype(np.float32)
    out, inter = run(CONFIG, params, pixels)
    assert out.shape == (1, 6 * 5, 32)
    patches = pixels.reshape(1, 6, 4, 5, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(1, 30, 48)
    conv = patches @ np.asarray(params["embedding"]["kernel"]).reshape(48, 32)
    posemb = np.asarray(inter["embedded"][0]) - conv - params["embedding"]["bias"]
    want = resample_posemb(jnp.asarray(params["pos_embedding"]), (4, 4), (6, 5))
    np.testing.assert_allclose(posemb[0], want, atol=1e-5)


def test_scan_and_remat_match_loop(params, pixels):
    out, inter = run(CONFIG, params, pixels)
    scan_params = stack_layers(params, CONFIG.depth)
    for overrides in (dict(scan=True), dict(scan=True, remat=True), dict(remat=True)):
        config = dataclasses.replace(CONFIG, **overrides)
        got, got_inter = run(config, scan_params if config.scan else params, pixels)
        np.testing.assert_allclose(got, out, atol=1e-5)
        np.testing.assert_allclose(got_inter["pooled"][0], inter["pooled"][0], atol=1e-5)
        for i in range(CONFIG.depth):
            block = (
                got_inter["layers"]["out"][0][i]
                if config.scan
                else got_inter[f"layers_{i}"]["out"][0]
            )
            np.testing.assert_allclose(block, inter[f"layers_{i}"]["out"][0], atol=1e-5)


def test_scan_remat_gradients_match_loop(params, pixels):
    def grad(config, p):
        loss = lambda p: jnp.sum(VisionTransformer(config).apply({"params": p}, pixels) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(p)

    grads = grad(CONFIG, params)
    scan_config = dataclasses.replace(CONFIG, scan=True, remat=True, pool="none")
    scan_params = stack_layers({k: v for k, v in params.items() if k != "head"}, CONFIG.depth)
    scan_grads = grad(scan_config, scan_params)
    want = stack_layers({k: v for k, v in grads.items() if k != "head"}, CONFIG.depth)
    # atol: key biases get rounding-noise gradients (~3e-5; softmax ignores a per-row shift).
    for got, exp in zip(jax.tree.leaves(scan_grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "output,scan", [("penultimate", False), ("penultimate", True), (0, True), (2, False)]
)
def test_an_output_block_count_is_that_blocks_output_without_norm(params, pixels, scan, output):
    """``"penultimate"`` is block ``depth - 2``'s output; an int ``n`` is HF's
    ``hidden_states[n]``: the embedding for 0, block ``n - 1``'s output otherwise."""
    _, inter = run(CONFIG, params, pixels)
    hidden_states = [inter["embedded"][0], inter["layers_0"]["out"][0], inter["layers_1"]["out"][0]]
    config = dataclasses.replace(CONFIG, output=output, scan=scan)
    got, _ = run(config, stack_layers(params, CONFIG.depth) if scan else params, pixels)
    np.testing.assert_allclose(got, hidden_states[config.output_blocks], atol=1e-5)


def test_bfloat16_compute(params, pixels):
    out, _ = run(CONFIG, params, pixels)
    got, _ = run(dataclasses.replace(CONFIG, dtype="bfloat16"), params, pixels)
    assert got.dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa; outputs are LayerNorm-scaled, O(1).
    np.testing.assert_allclose(got.astype(np.float32), out, atol=0.1)


def test_logical_axes_and_sharded_jit(pixels):
    model = VisionTransformer(dataclasses.replace(CONFIG, scan=True))
    abstract = jax.eval_shape(model.init, jax.random.key(0), pixels)
    specs = nn.get_partition_spec(abstract)["params"]
    shapes = nn.unbox(abstract)["params"]
    for spec, shape in zip(jax.tree.leaves(specs), jax.tree.leaves(shapes), strict=True):
        assert len(spec) == len(shape.shape)
    names = {
        ("layers", "attn", "query", "kernel"): ("layers", "embed", "heads", "head_dim"),
        ("layers", "attn", "out", "kernel"): ("layers", "heads", "head_dim", "embed"),
        ("layers", "mlp", "fc1", "kernel"): ("layers", "embed", "mlp"),
        ("embedding", "kernel"): ("patch_height", "patch_width", "channels", "embed"),
        ("head", "in_proj_kernel"): (None, "embed", "heads", "head_dim"),
    }
    for path, want in names.items():
        spec = specs
        for name in path:
            spec = spec[name]
        assert tuple(spec) == want, path
    mesh = make_mesh((1, 1, 1, 1), jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
        variables = jax.jit(model.init)(jax.random.key(0), pixels)
        assert jax.jit(model.apply)(variables, pixels).shape == (2, 16, 32)
