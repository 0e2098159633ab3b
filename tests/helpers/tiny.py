"""The tests' shrunken model: configs/demo.py at 32x32 inputs, base width 4, depth 2."""

from __future__ import annotations


def tiny_config(data_dir: str = ""):
    from lggunet.configs import demo

    config = demo.get_config()
    config.data.data_dir = str(data_dir)
    config.data.image_size = 32
    config.data.num_threads = 2
    config.model.features = 4
    config.model.depth = 2
    config.summary_images = 2
    return config


def fresh_state(config, seed: int = 0):
    """`steps.create_train_state(config, key(seed))`, compiled as `steps.initial_state` is
    (unoptimised: called eagerly, each initialiser's draw compiles alone, at length)."""
    import jax

    from lggunet import steps

    init = jax.jit(lambda: steps.create_train_state(config, jax.random.key(seed)))
    return init.lower().compile(compiler_options={"xla_backend_optimization_level": 0})()
