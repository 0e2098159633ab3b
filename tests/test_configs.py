"""Every shipped config passes the checks, and the CPU recipe has the size it says."""

import jax
import ml_collections
import pytest

from lggunet import configuration, steps
from lggunet.configs import cpu, demo, gpu, unet


@pytest.mark.parametrize("module", [unet, demo, cpu, gpu])
def test_shipped_configs_pass_the_checks(module):
    config = module.get_config()
    configuration.check(config)
    # Saved with the current version: an older lggunet then refuses the run's new fields.
    assert config.config_version == configuration.VERSION


def unet_parameters(base: int, depth: int) -> int:
    """By hand: two 3x3 conv + BatchNorm (scale, bias) per block, 2x2 transposed convs up,
    a 1x1 head."""

    def block(cin, c):
        return (9 * cin * c + c) + 2 * c + (9 * c * c + c) + 2 * c

    widths = [base * 2**i for i in range(depth + 1)]
    total, cin = 0, 3
    for w in widths:  # down path and bottleneck
        total += block(cin, w)
        cin = w
    for w in reversed(widths[:-1]):  # up path: transposed conv, concat, block
        total += 4 * cin * w + w + block(2 * w, w)
        cin = w
    return total + (cin + 1)


def test_cpu_recipe_size():
    config = cpu.get_config()
    params = jax.eval_shape(lambda: steps.create_train_state(config, jax.random.key(0))).params
    expected = unet_parameters(config.model.features, config.model.depth)
    assert sum(x.size for x in jax.tree.leaves(params)) == expected == 1_944_049


def _set(config, field, value):
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value


@pytest.mark.parametrize("field", sorted(configuration.RANGES))
def test_every_ranged_field_refuses_values_outside_its_range(field):
    low, high, inclusive = configuration.RANGES[field]
    outside = []
    if low is not None:
        outside.append(low - 1 if inclusive else low)
    if high is not None:
        outside.append(high + 1 if inclusive else high)
    for value in outside:
        config = unet.get_config()
        _set(config, field, value)
        with pytest.raises(configuration.ConfigError) as e:
            configuration.check(config)
        stored = configuration._get(config, field)  # ConfigDict keeps a float field float
        assert str(e.value).startswith(f"{field}={stored!r} is out of range"), str(e.value)
        assert stored == value
    config = unet.get_config()
    _set(config, field, float("nan"))
    with pytest.raises(configuration.ConfigError, match=f"{field}=nan must be a number"):
        configuration.check(config)


def test_a_count_that_is_not_a_whole_number_is_refused_naming_the_saved_file(tmp_path):
    tree = unet.get_config().to_dict()
    tree["predict"]["min_component_voxels"] = 7.5  # as a hand-edited config.json could say
    config = ml_collections.ConfigDict(tree)
    with pytest.raises(configuration.ConfigError) as e:
        configuration.check_saved(config, tmp_path / "config.json")
    message = str(e.value)
    assert "config.json" in message and "min_component_voxels=7.5 must be a whole number" in message
    tree["predict"]["min_component_voxels"] = 7.0  # not silently 7 either
    with pytest.raises(configuration.ConfigError, match="must be a whole number"):
        configuration.check_saved(ml_collections.ConfigDict(tree), tmp_path / "config.json")


def test_learning_rate_schedule_fields_are_checked():
    config = unet.get_config()
    config.lr_schedule = "linear"
    with pytest.raises(configuration.ConfigError, match="lr_schedule='linear': use one of"):
        configuration.check(config)
    config = unet.get_config()
    config.lr_schedule = "cosine"
    config.num_epochs = 3
    config.warmup_epochs = 3.0
    with pytest.raises(configuration.ConfigError, match="warmup_epochs=3.0 must be below"):
        configuration.check(config)
    config.warmup_epochs = 0.5
    configuration.check(config)
    config.evaluate.checkpoint = "newest"
    with pytest.raises(configuration.ConfigError, match="evaluate.checkpoint='newest': use one"):
        configuration.check(config)
    config.evaluate.checkpoint = "last"
    configuration.check(config)
    config.lr_schedule = "plateau"  # which has no warm-up: refused, not ignored
    with pytest.raises(configuration.ConfigError, match="works with lr_schedule='cosine' only"):
        configuration.check(config)


def test_recipe_line_names_the_model_options_set():
    """The one-line recipe in reports names InstanceNorm, deep supervision and fainter
    tumours when set."""
    config = cpu.get_config()
    plain = configuration.describe(config)
    assert plain.startswith("Recipe: 128x128 input, loss bce_dice")
    assert "InstanceNorm" not in plain and "deep supervision" not in plain
    assert "fainter" not in plain
    config.augment.tumour_contrast_p = 0.3
    assert ", tumour slices x3, fainter tumours (p 0.3)" in configuration.describe(config)
    config.model.norm, config.model.deep_supervision = "instance", 2
    assert configuration.describe(config).endswith(", InstanceNorm, deep supervision (2 levels)")


def test_fainter_tumours_need_the_intensity_transforms():
    """`augment.tumour_contrast_p` is refused, naming the fix, where no intensity transform
    runs (it would change nothing); accepted with the flag or the preset."""
    config = unet.get_config()
    config.augment.tumour_contrast_p = 0.2
    with pytest.raises(configuration.ConfigError, match="augment.tumour_contrast_p=0.2 is an"):
        configuration.check(config)
    config.augment.intensity, config.data.normalize = True, "brain_zscore"
    configuration.check(config)
    config = cpu.get_config()
    config.augment.tumour_contrast_p = 0.2
    configuration.check(config)
    config.augment.enabled = False
    with pytest.raises(configuration.ConfigError, match="is an intensity transform"):
        configuration.check(config)
    config.augment.enabled, config.augment.tumour_contrast_p = True, 1.5
    with pytest.raises(configuration.ConfigError, match="tumour_contrast_p"):
        configuration.check(config)
