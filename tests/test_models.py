"""U-Net: shapes, an independently computed parameter count, and gradient flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lggunet import models


def expected_params(base: int, depth: int, in_ch: int = 3, batch_norm: bool = True) -> int:
    """Counts weights by hand: 3x3 convs with bias, BN scale+bias, 2x2 transposed convs, head."""

    def conv(cin, cout, k):
        return k * k * cin * cout + cout

    def block(cin, cout):
        return conv(cin, cout, 3) + conv(cout, cout, 3) + (4 * cout if batch_norm else 0)

    total, cin = 0, in_ch
    for level in range(depth):
        total += block(cin, base * 2**level)
        cin = base * 2**level
    total += block(cin, base * 2**depth)
    for level in reversed(range(depth)):
        w = base * 2**level
        total += conv(2 * w, w, 2) + block(2 * w, w)
    return total + conv(base, 1, 1)


def count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def assert_same_layer(ours, reference, variables, x) -> None:
    """`ours` gives flax layer `reference`'s output, and the same gradients with respect to
    the parameters and the input, from the same `variables` (float rounding aside)."""
    np.testing.assert_allclose(
        ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5
    )

    def loss(module):
        return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

    g_ref = jax.grad(loss(reference), argnums=(0, 1))(variables, x)
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_ours), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_classic_unet_parameter_count():
    model = models.UNet(features=64, depth=4)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False)
    )
    n = count(shapes["params"])
    assert n == expected_params(64, 4)
    assert 31.0e6 < n < 31.1e6  # the classic ~31M U-Net (plus 11,776 BatchNorm weights)
    no_bn = models.UNet(features=64, depth=4, batch_norm=False)
    shapes = jax.eval_shape(
        lambda: no_bn.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False)
    )
    assert count(shapes["params"]) == expected_params(64, 4, batch_norm=False) == 31_031_745


@pytest.mark.parametrize("size,base,depth", [(32, 4, 2), (64, 8, 3), (48, 4, 4), (40, 4, 4)])
def test_output_shape_and_dtype(size, base, depth):
    model = models.UNet(features=base, depth=depth)
    x = jnp.zeros((2, size, size, 3))
    if size % 2**depth:
        with pytest.raises(ValueError, match="divisible"):
            model.init(jax.random.key(0), x)
        return
    variables = model.init(jax.random.key(0), x)
    assert count(variables["params"]) == expected_params(base, depth)
    y = model.apply(variables, x)
    assert y.shape == (2, size, size, 1) and y.dtype == jnp.float32


def test_gradients_reach_first_conv():
    model = models.UNet(features=4, depth=2)
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)

    def loss(params):
        y, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(jax.nn.sigmoid(y))

    grads = jax.grad(loss)(variables["params"])
    first = grads["ConvBlock_0"]["Conv_0"]["kernel"]
    assert first.shape == (3, 3, 3, 4)
    assert np.all(np.isfinite(first)) and float(jnp.abs(first).sum()) > 0


def test_bfloat16_compute_keeps_float32_params():
    model = models.UNet(features=4, depth=2, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
    assert model.apply(variables, jnp.zeros((1, 32, 32, 3))).dtype == jnp.float32


def test_upsample_equals_flax_conv_transpose():
    """The U-Net's fast 2x2 stride-2 up-sampling gives flax's ConvTranspose's result with the
    same parameters (so checkpoints keep their meaning), forward and gradients."""
    import flax.linen as nn

    from lggunet.models import Upsample2x

    x = jax.random.normal(jax.random.key(1), (2, 5, 7, 6))
    reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2))
    variables = reference.init(jax.random.key(0), x)
    variables["params"]["bias"] = jax.random.normal(jax.random.key(2), (4,))
    ours = Upsample2x(4)
    assert_same_layer(ours, reference, variables, x)


def test_max_pool_matches_numpy_windows_and_flax():
    """max_pool_2x2 equals a NumPy loop over 2x2 windows and flax's nn.max_pool; without ties
    its gradient is flax's (1 at each window's maximum); a tie shares it equally."""
    import flax.linen as nn

    from lggunet.models import max_pool_2x2

    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 4, 3)))
    expected = np.empty((2, 3, 2, 3), np.float32)
    for i in range(3):
        for j in range(2):
            expected[:, i, j] = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].max(axis=(1, 2))
    np.testing.assert_array_equal(max_pool_2x2(jnp.asarray(x)), expected)
    np.testing.assert_array_equal(nn.max_pool(x, (2, 2), strides=(2, 2)), expected)

    weights = jax.random.normal(jax.random.key(1), expected.shape)

    def loss(pool):
        return lambda x: jnp.sum(pool(x) * weights)

    flax_pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
    np.testing.assert_array_equal(
        jax.grad(loss(max_pool_2x2))(jnp.asarray(x)), jax.grad(loss(flax_pool))(jnp.asarray(x))
    )
    tie = jnp.array([[3.0, 3.0], [1.0, 3.0]]).reshape(1, 2, 2, 1)
    grad = jax.grad(lambda x: max_pool_2x2(x).sum())(tie)
    np.testing.assert_allclose(grad.reshape(2, 2), [[1 / 3, 1 / 3], [0.0, 1 / 3]])


@pytest.mark.parametrize("momentum", [0.99, 0.9])
def test_batchnorm_running_mean_follows_momentum(momentum):
    """After one training-mode call from fresh statistics (mean 0), the first BatchNorm's
    running mean is (1 - momentum) x the batch mean of the first convolution's output,
    computed here with NumPy from that convolution's own parameters."""
    model = models.UNet(features=4, depth=2, bn_momentum=momentum)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    conv = variables["params"]["ConvBlock_0"]["Conv_0"]
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernel = np.asarray(conv["kernel"])
    out = sum(
        np.einsum("bhwc,co->bhwo", xp[:, i : i + 8, j : j + 8], kernel[i, j])
        for i in range(3)
        for j in range(3)
    ) + np.asarray(conv["bias"])
    running = updated["batch_stats"]["ConvBlock_0"]["BatchNorm_0"]["mean"]
    np.testing.assert_allclose(running, (1 - momentum) * out.mean(axis=(0, 1, 2)), atol=1e-5)


def test_instance_norm_matches_numpy_and_ignores_the_batch():
    """With norm="instance" the first normalisation layer's output is the first convolution's
    output standardised per example and channel over the image (NumPy, epsilon 1e-5), in
    training and inference alike; no running statistics exist; and an example's logits do not
    depend on the other examples of its batch (BatchNorm's do in training)."""
    model = models.UNet(features=4, depth=2, norm="instance")
    x = (
        jax.random.normal(jax.random.key(3), (3, 8, 8, 3))
        * jnp.array([1.0, 3.0, 0.2])[:, None, None, None]
    )
    variables = model.init(jax.random.key(0), x)
    assert set(variables) == {"params"}
    conv = variables["params"]["ConvBlock_0"]["Conv_0"]
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(
        np.einsum("bhwc,co->bhwo", xp[:, i : i + 8, j : j + 8], np.asarray(conv["kernel"])[i, j])
        for i in range(3)
        for j in range(3)
    ) + np.asarray(conv["bias"])
    mean, var = out.mean(axis=(1, 2), keepdims=True), out.var(axis=(1, 2), keepdims=True)
    expected = (out - mean) / np.sqrt(var + 1e-5)
    for train in (True, False):
        _, inter = model.apply(
            variables, x, train=train, capture_intermediates=True, mutable=["intermediates"]
        )
        got = inter["intermediates"]["ConvBlock_0"]["InstanceNorm_0"]["__call__"][0]
        np.testing.assert_allclose(got, expected, atol=1e-4)
    alone = model.apply(variables, x[:1], train=True)
    together = model.apply(variables, x, train=True)
    np.testing.assert_allclose(alone[0], together[0], atol=1e-4)
    batch = models.UNet(features=4, depth=2)
    bv = batch.init(jax.random.key(0), x)
    alone_bn, _ = batch.apply(bv, x[:1], train=True, mutable=["batch_stats"])
    together_bn, _ = batch.apply(bv, x, train=True, mutable=["batch_stats"])
    assert np.abs(np.asarray(alone_bn[0] - together_bn[0])).max() > 1e-2


def test_unknown_norm_is_refused():
    from lggunet import configuration
    from lggunet.configs import demo
    from lggunet.errors import ConfigError

    config = demo.get_config()
    config.model.norm = "layer"
    with pytest.raises(ConfigError, match="model.norm='layer': use one of"):
        configuration.check(config)
    with pytest.raises(ValueError, match="norm='layer'"):
        models.UNet(features=4, depth=2, norm="layer").init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3))
        )


def test_output_bias_sets_the_initial_logit_prior():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    plain = models.UNet(features=4, depth=2)
    prior = models.UNet(features=4, depth=2, output_bias=-4.0)
    v0 = plain.init(jax.random.key(0), x)
    v1 = prior.init(jax.random.key(0), x)
    head = [k for k in v1["params"] if k.startswith("Conv_")]
    assert len(head) == 1  # the 1x1 output convolution
    np.testing.assert_array_equal(v0["params"][head[0]]["bias"], [0.0])
    np.testing.assert_array_equal(v1["params"][head[0]]["bias"], [-4.0])
    # Same other weights (same key), so the logits differ by exactly the bias.
    np.testing.assert_allclose(prior.apply(v1, x), plain.apply(v0, x) - 4.0, atol=1e-5)


@pytest.mark.parametrize("bias", [float("nan"), float("inf"), 25.0])
def test_output_bias_out_of_range_is_refused(bias):
    from lggunet import configuration
    from lggunet.configs import demo
    from lggunet.errors import ConfigError

    config = demo.get_config()
    config.model.output_bias = bias
    with pytest.raises(ConfigError, match="model.output_bias"):
        configuration.check(config)


def test_accelerator_layer_equals_flax_conv():
    """PixelLinear (the 1x1 output layer as a matrix product) has nn.Conv's parameters (same
    initial values) and gives its result and gradients (float rounding aside)."""
    import flax.linen as nn

    from lggunet.models import PixelLinear

    x = jax.random.normal(jax.random.key(1), (2, 6, 5, 3))
    pairs = [(PixelLinear(1), nn.Conv(1, (1, 1))), (PixelLinear(4), nn.Conv(4, (1, 1)))]
    for ours, reference in pairs:
        variables = reference.init(jax.random.key(0), x)
        mine = ours.init(jax.random.key(0), x)
        for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(variables), strict=True):
            np.testing.assert_array_equal(a, b)
        variables["params"]["bias"] = jax.random.normal(jax.random.key(2), (reference.features,))
        assert_same_layer(ours, reference, variables, x)


def test_accelerator_unet_is_the_same_network():
    """UNet(accelerator=True) (the GPU layer forms, which it does use) initialises the same
    parameters as the CPU form and computes the same logits and parameter gradients from
    them; `model.gpu_layers` "auto" leaves it off on the CPU, "on" / "off" force it."""
    from lggunet.configs import unet
    from lggunet.errors import ConfigError
    from lggunet.models import PixelLinear

    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    plain = models.UNet(features=8, depth=2)
    fast = models.UNet(features=8, depth=2, accelerator=True)
    variables = plain.init(jax.random.key(0), x)
    for a, b in zip(
        jax.tree.leaves(fast.init(jax.random.key(0), x)), jax.tree.leaves(variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)

    def loss(model):
        def f(params):
            y, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean(jnp.sin(y)), y

        return jax.value_and_grad(f, has_aux=True)(variables["params"])

    (_, y_plain), g_plain = loss(plain)
    (_, y_fast), g_fast = loss(fast)
    np.testing.assert_allclose(y_fast, y_plain, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    _, used = fast.apply(
        variables,
        x,
        capture_intermediates=lambda module, _: isinstance(module, PixelLinear),
    )
    used = jax.tree_util.tree_flatten_with_path(used["intermediates"])[0]
    names = sorted(jax.tree_util.keystr(path[:-2]) for path, _ in used)
    assert names == ["['Conv_0']"]  # the output layer
    config = unet.get_config()
    assert models.create(config).accelerator is (jax.default_backend() != "cpu")  # "auto"
    config.model.gpu_layers = "on"
    assert models.create(config).accelerator is True
    config.model.gpu_layers = "off"
    assert models.create(config).accelerator is False
    config.model.gpu_layers = "yes"
    with pytest.raises(ConfigError, match="model.gpu_layers='yes'"):
        models.create(config)


def test_deep_supervision_heads_are_1x1_convolutions_of_the_decoder_levels():
    """deep_supervision=2 on a depth-3 U-Net: one extra 1x1 head (width * 1 weights + 1 bias)
    for decoder levels 1 and 2; in training each sown logit map is that head applied (NumPy)
    to its level's decoder output at 1/2**i of the size; inference sows nothing, and the
    full-size output is the plain U-Net's with the same weights."""
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    model = models.UNet(features=4, depth=3, deep_supervision=2)
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    heads = sorted(k for k in params if k.startswith("DeepSupervision_"))
    assert heads == ["DeepSupervision_1", "DeepSupervision_2"]
    assert count(params) == expected_params(4, 3) + (8 + 1) + (16 + 1)
    logits, updates = model.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, _: isinstance(mdl, models.ConvBlock),
    )
    inter = updates["intermediates"]
    # decoder ConvBlocks after the encoder's 3 and the bottleneck: 4 (level 2), 5 (1), 6 (0)
    for level, block in ((2, "ConvBlock_4"), (1, "ConvBlock_5")):
        features = np.asarray(inter[block]["__call__"][0])
        assert features.shape == (2, 16 // 2**level, 16 // 2**level, 4 * 2**level)
        head = params[f"DeepSupervision_{level}"]
        expected = features @ np.asarray(head["kernel"])[0, 0] + np.asarray(head["bias"])
        sown = np.asarray(inter[f"deep_supervision_{level}"][0])
        np.testing.assert_allclose(sown, expected, rtol=1e-5, atol=1e-5)
    _, at_inference = model.apply(variables, x, mutable=["intermediates"])
    assert not at_inference
    plain = models.UNet(features=4, depth=3)
    shared = {k: v for k, v in params.items() if not k.startswith("DeepSupervision_")}
    np.testing.assert_array_equal(
        plain.apply({**variables, "params": shared}, x), model.apply(variables, x)
    )
    assert logits.shape == (2, 16, 16, 1)


@pytest.mark.parametrize(
    "levels, message",
    [(-1, "is out of range"), (3, ": use 0 .off. to model.depth - 1 .2."), (True, "a number")],
)
def test_deep_supervision_out_of_range_is_refused(levels, message):
    """In a config to train (depth 3: 0..2) and in a saved one that a model is loaded from."""
    from lggunet import configuration
    from lggunet.configs import demo
    from lggunet.errors import ConfigError

    config = demo.get_config()
    config.model.depth = 3
    config.model.deep_supervision = levels if isinstance(levels, int) else 0
    if levels is True:  # a flag cannot set a bool into an int field; a config file can
        config.model.unlock()
        config.model["deep_supervision"] = True
    with pytest.raises(ConfigError, match=f"model.deep_supervision={levels!r}.*{message}"):
        configuration.check(config)
    with pytest.raises(ConfigError, match=f"saved.json: not a usable saved config.*{message}"):
        configuration.check_saved(config, "saved.json")
    if levels is not True:
        with pytest.raises(ValueError, match=f"deep_supervision={levels}"):
            models.UNet(features=4, depth=3, deep_supervision=levels).init(
                jax.random.key(0), jnp.zeros((1, 16, 16, 3))
            )
