"""The shape of the package: no import cycles, a light inference path, small modules and
functions, configs installed with the package, one evaluator for training and reports."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lggunet"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """lggunet modules `path` imports, at module level or inside functions."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            subs = {f"{base}.{a.name}" for a in node.names}
            found |= subs
            if not subs <= set(modules):  # a name defined in `base` itself, not a submodule
                found.add(base)
    return {m for m in found if m in modules and m != name and m != "lggunet"}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert "lggunet.train" in graph["lggunet.cross_validation"]  # the walk sees lazy imports


def test_inference_loads_neither_training_nor_the_data_pipeline():
    code = (
        "import sys, json, lggunet, lggunet.inference; lggunet.load_model; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = ("tensorflow_datasets", "grain", "matplotlib", "tensorflow")
    ours = ("lggunet.train", "lggunet.input_pipeline", "lggunet.dataset", "lggunet.feed")
    bad = [m for m in loaded if m.split(".")[0] in heavy or m in ours]
    assert bad == []


def test_modules_and_functions_stay_small():
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []


def test_configs_import_from_anywhere_and_the_console_script_is_declared(tmp_path):
    code = (
        "from lggunet.configs import cpu, demo, gpu, unet; "
        "print(cpu.get_config().data.cv_folds, demo.get_config().data.phantom, "
        "gpu.get_config().dtype)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.split() == ["5", "True", "bfloat16"]
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("lggunet") == "lggunet.cli:run"


def test_config_flag_accepts_paths_and_packaged_names(tmp_path, monkeypatch):
    from lggunet import cli

    packaged = Path(cli.lggunet.configs.__file__).parent
    assert cli.packaged_config("cpu") == str(packaged / "cpu.py")
    assert cli.packaged_config("cpu:x") == f"{packaged / 'cpu.py'}:x"
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the packaged one is meant
    assert cli.packaged_config("configs/unet.py") == str(packaged / "unet.py")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "unet.py").write_text("")  # a user's own file wins
    assert cli.packaged_config("configs/unet.py") == "configs/unet.py"
    assert cli.packaged_config("mine.py") == "mine.py"
    assert cli.packaged_config("nosuch") == "nosuch"


def test_training_and_evaluate_report_the_same_numbers(tiny_config, synthetic_kaggle_3m, tmp_path):
    """One evaluator at one resolution: the final evaluation training logs and
    --mode=evaluate's plain variant agree on the best checkpoint, at the slices' 256x256
    (the model sees 32x32), and loading the model reads the weights only."""
    from lggunet import checkpointing, inference, report, train

    config = tiny_config
    config.data.manual_dir = str(synthetic_kaggle_3m)
    config.data.phantom = False
    config.data.split_fractions = (0.6, 0.2, 0.2)
    workdir = tmp_path / "run"
    final = train.train_and_evaluate(config, str(workdir))
    evaluated = report.evaluate_run(config, workdir)
    for split in ("validation", "test"):
        logged, scored = final[split], evaluated["splits"][split]
        assert scored["num_slices"] == logged["num_slices"]
        plain = scored["variants"]["plain"]
        assert plain["volume_dice"]["mean"] == pytest.approx(logged["volume_dice"], abs=1e-6)
        assert plain["slice_dice_mean"] == pytest.approx(logged["slice_dice"], abs=1e-6)
        for key in ("loss", "dice", "iou", "accuracy"):
            assert scored["notebook"]["plain"][key] == pytest.approx(logged[key], rel=1e-5)

    # The same on two devices: the weights go to every device of the mesh.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = [
        f"--workdir={workdir}",
        "--mode=evaluate",
        f"--config.data.manual_dir={config.data.manual_dir}",
    ]
    args.append(f"--config.data.data_dir={config.data.data_dir}")
    out = subprocess.run(
        [sys.executable, str(PACKAGE.parent / "run.py"), "--config=demo", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    two = json.loads((workdir / "report.json").read_text())
    for split in ("validation", "test"):
        a, b = evaluated["splits"][split], two["splits"][split]
        assert b["variants"]["plain"]["volume_dice"]["mean"] == pytest.approx(
            a["variants"]["plain"]["volume_dice"]["mean"], abs=1e-6
        )
        assert b["notebook"]["plain"]["dice"] == pytest.approx(a["notebook"]["plain"]["dice"])

    def no_full_restore(*args, **kwargs):
        raise AssertionError("inference restored the whole TrainState")

    original = checkpointing.CheckpointStore.restore
    checkpointing.CheckpointStore.restore = no_full_restore
    try:
        model = inference.load_model(workdir)
    finally:
        checkpointing.CheckpointStore.restore = original
    assert set(model.variables) == {"params", "batch_stats"}
    assert "U-Net features=4 depth=2" in repr(model) and "Array" not in repr(model)


def test_saved_configs_of_older_versions_are_upgraded_and_newer_refused(tmp_path, monkeypatch):
    from lggunet import configuration
    from lggunet.configs import cpu
    from lggunet.errors import ConfigError

    config = cpu.get_config()
    tree = config.to_dict()
    del tree["config_version"], tree["model"]["bn_momentum"], tree["data"]["cv_folds"]
    del tree["data"]["cv_fold"], tree["augment"]["intensity"], tree["lr_schedule"]
    del tree["warmup_epochs"], tree["model"]["output_bias"], tree["soft_targets"]
    del tree["augment"]["channel_copy_p"], tree["augment"]["intensity_p_scale"]
    del tree["model"]["gpu_layers"]
    (tmp_path / "config.json").write_text(json.dumps(tree))
    old = configuration.saved_config(tmp_path)
    assert old.config_version == configuration.VERSION
    assert (old.model.bn_momentum, old.data.cv_folds, old.data.cv_fold) == (0.99, 0, -1)
    assert old.augment.intensity is False
    assert old.lr_schedule == "plateau"  # how runs before the field trained
    assert old.model.output_bias == 0.0
    assert old.soft_targets is False  # binary targets, as runs trained before the field
    assert old.augment.channel_copy_p == 0.1  # nnU-Net's, fixed before the field
    assert old.augment.intensity_p_scale == 1.0  # nnU-Net's probabilities, as before
    assert old.model.gpu_layers == "off"  # the layer forms of runs before the field
    configuration.check(old)
    tree["model"]["output_bias"] = None  # present but not a number: refused, not a traceback
    (tmp_path / "config.json").write_text(json.dumps(tree))
    with pytest.raises(ConfigError, match="not a usable saved config .model.output_bias=None"):
        configuration.saved_config(tmp_path)
    del tree["model"]["output_bias"]
    tree["config_version"] = configuration.VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(tree))
    with pytest.raises(ConfigError, match="newer than this lggunet"):
        configuration.saved_config(tmp_path)

    # A later command: the run's model, split and eval batch (the notebook's batch metrics
    # depend on it), this command's paths and evaluate.*.
    given = cpu.get_config()
    given.data.manual_dir, given.data.image_size = "/new/data", 64
    given.evaluate.tta, given.eval_batch_size = False, 8
    resolved = configuration.for_evaluation(config, given)
    assert resolved.data.manual_dir == "/new/data" and resolved.data.image_size == 128
    assert resolved.evaluate.tta is False
    assert resolved.eval_batch_size == config.eval_batch_size != 8
    # On a machine whose devices do not divide the run's eval batch (32 over 3), the given one.
    monkeypatch.setattr(configuration.jax, "device_count", lambda: 3)
    given.eval_batch_size = 9
    assert configuration.for_evaluation(config, given).eval_batch_size == 9
    assert configuration.for_evaluation(None, given).data.image_size == 64


@pytest.mark.parametrize("value", ["nosuch", "configs/nosuch.py", "/nonexistent/cfg.py"])
def test_a_config_that_is_neither_a_file_nor_packaged_is_one_line(value, tmp_path):
    out = subprocess.run(
        [sys.executable, str(PACKAGE.parent / "run.py"), f"--config={value}", "--workdir=w"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    packaged = "(cpu, demo, gpu, unet)"
    assert out.stderr.strip().splitlines() == [
        f"error: --config={value}: no such config file, nor a packaged config {packaged}"
    ]
