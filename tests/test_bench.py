"""The GPU benchmark (bench/gpu.py) runs, and the FLOP count its MFU rests on agrees with
one counted by hand (its MFU figures on an H100 rest on that count)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lggunet

REPO = Path(__file__).resolve().parents[1]


def unet_forward_flops(size: int, base: int, depth: int, batch: int) -> int:
    """Multiply-adds x 2 of every convolution, counted by hand (BatchNorm, ReLU, pooling and
    biases, a few percent, left out)."""

    def conv(h, cin, cout, k):
        return 2 * h * h * cin * cout * k * k

    flops, cin, h = 0, 3, size
    for level in range(depth + 1):
        width = base * 2**level
        flops += conv(h, cin, width, 3) + conv(h, width, width, 3)
        cin, h = width, h // 2 if level < depth else h
    for level in reversed(range(depth)):
        width = base * 2**level
        flops += 2 * h * h * cin * width * 4  # 2x2 stride-2 up-sampling, from the coarse grid
        h *= 2
        flops += conv(h, 2 * width, width, 3) + conv(h, width, width, 3)
        cin = width
    return batch * (flops + conv(h, base, 1, 1))


def test_gpu_bench_smoke_counts_train_step_flops():
    out = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke", "--dtypes=float32"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = re.search(r"^\| float32 \| 4 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", out.stdout, re.M)
    assert row, out.stdout
    step_ms, images_per_s, gflop = map(float, row.groups())
    assert abs(images_per_s - 4 / (step_ms / 1000)) < 0.01 * images_per_s + 0.1
    forward = unet_forward_flops(size=64, base=8, depth=4, batch=4) / 1e9
    # The table rounds to 0.1 GFLOP; the exact count is checked below.
    assert abs(gflop - 3 * forward) < 0.06, (gflop, 3 * forward)


def test_model_flops_of_the_train_step_match_a_hand_count():
    """bench/gpu.py's MFU rests on this count: a train step is a forward pass and two backward
    products per convolution, 3x forward, less the input gradient of the first convolution
    (the image needs none); the augmentation's small matrix products add a trace."""
    sys.path[:0] = [str(REPO / "bench"), str(REPO)]
    try:
        import common
        import jax
        from gpu import model_flops

        from lggunet import parallel, steps
        from lggunet.configs import unet
    finally:
        del sys.path[:2]
    config = unet.get_config()
    config.data.image_size, config.model.features, config.batch_size = 64, 8, 4
    mesh = parallel.data_mesh()
    state, rng = steps.initial_state(config, mesh)
    step = steps.compile_steps(config, mesh).train
    batch = parallel.global_batch(common.synthetic_batch(4, 64), mesh)
    counted = model_flops(jax.make_jaxpr(step)(state, batch, rng).jaxpr)
    forward = unet_forward_flops(size=64, base=8, depth=4, batch=4)
    first_conv_input_grad = 4 * 2 * 64 * 64 * 3 * 8 * 9
    expected = 3 * forward - first_conv_input_grad
    assert abs(counted - expected) < 1e-3 * expected, (counted, expected)
    assert abs(counted - 3 * forward) > 1e-3 * expected  # the correction is seen, not rounded


def test_device_check_smoke_prints_every_figure(tmp_path):
    """bench/device_check.py at tiny sizes: every check runs and reports measured numbers
    (the same script times the notebook's configuration on a lent GPU)."""
    out = subprocess.run(
        [sys.executable, "bench/device_check.py", "--smoke", f"--out={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    lines = [json.loads(x) for x in out.stdout.splitlines()]  # nothing but JSON lines
    assert [x["check"] for x in lines] == [
        "versions",
        "train_step",
        "train_step",
        "run",
        "run_grain",
        "done",
    ]
    assert lines[-1]["failed"] == []
    assert {x["dtype"] for x in lines[1:3]} == {"bfloat16", "float32"}
    for run in lines[3:5]:
        assert run["images_per_s_median"] > 0 and run["extrapolated_100_epochs_s"] > 0
        assert run["loop_step_ms"] > 0 and isinstance(run["host_overhead"], float)
        epochs = run["epochs"]
        assert len(run["gc_full_collections_by_epoch"]) == len(run["gc_full_ms_by_epoch"]) == epochs
        assert all(n >= 0 for n in run["gc_full_collections_by_epoch"])
    assert lines[3]["device_cache"] and not lines[4]["device_cache"]
    # The cached run traced steps 3-5 of its 4 (the trace closes with the run): each step
    # gathers its batch on the device and launches the train step, once.
    traced = lines[3]["loop_profile"]
    assert traced["steps"] == [4] and lines[4]["loop_profile"] is None  # 3 fetched untraced
    assert traced["jit_calls_per_step"] == {"_gather_rows": 1.0, "train_fn": 1.0}
    assert traced["host_ms_in_step_median"] > 0
    assert (tmp_path / "device_check.jsonl").read_text().count("\n") == len(lines)
    syntax = subprocess.run(["bash", "-n", "bench/device_check.sh"], cwd=REPO)
    assert syntax.returncode == 0


def _write_cv(folder, scores, folds=None):
    folder.mkdir()
    columns = ("dice", "dice_tta", "dice_lcc", "dice_tta_lcc")
    lines = ["patient,fold," + ",".join(columns)]
    for i, (patient, score) in enumerate(scores.items()):
        fold = (folds or {}).get(patient, i % 2)
        lines.append(f"{patient},{fold}," + ",".join(str(score) for _ in columns))
    (folder / "cv_patients.csv").write_text("\n".join(lines) + "\n")


def test_compare_cv_pairs_patients_and_refuses_other_folds(tmp_path):
    a = {"P1": 0.5, "P2": 0.8, "P3": 0.05}
    b = {"P1": 0.7, "P2": 0.7, "P3": 0.65}
    _write_cv(tmp_path / "a", a)
    _write_cv(tmp_path / "b", b)
    cmd = [sys.executable, "bench/compare_cv.py", str(tmp_path / "a"), str(tmp_path / "b")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| plain |"))
    # Hand-computed: means 0.45 and 0.6833, paired difference (0.2 - 0.1 + 0.6) / 3.
    assert "| 0.4500 | 0.6833 | +0.2333 (" in row
    assert row.endswith("| 2 / 1 | 0.7000 | 0 |")
    _write_cv(tmp_path / "c", b, folds={"P1": 1})
    cmd[-1] = str(tmp_path / "c")
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert refused.returncode != 0 and "different folds: ['P1']" in refused.stderr


def _write_fold(folder, fold, scores, done=True):
    fold_dir = folder / f"fold_{fold}"
    fold_dir.mkdir(parents=True)
    columns = ("dice", "dice_tta", "dice_lcc", "dice_tta_lcc")
    lines = ["patient,split," + ",".join(columns)]
    lines.append("VAL,validation," + ",".join("0.0" for _ in columns))  # not a test row
    lines += [f"{p},test," + ",".join(str(s) for _ in columns) for p, s in scores.items()]
    (fold_dir / "report_patients.csv").write_text("\n".join(lines) + "\n")
    if done:
        (fold_dir / "fold_done.json").write_text("{}\n")


def test_compare_cv_finished_folds_pairs_only_folds_both_runs_finished(tmp_path):
    _write_fold(tmp_path / "a", 0, {"P1": 0.5, "P2": 0.8})
    _write_fold(tmp_path / "a", 1, {"P3": 0.1})
    _write_fold(tmp_path / "b", 0, {"P1": 0.7, "P2": 0.7})
    _write_fold(tmp_path / "b", 1, {"P3": 0.9}, done=False)  # still training: left out
    cmd = [sys.executable, "bench/compare_cv.py", str(tmp_path / "a"), str(tmp_path / "b")]
    out = subprocess.run(cmd + ["--finished-folds"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Only folds [0]" in out.stdout and "2 patients" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("| plain |"))
    # Hand-computed over P1, P2: means 0.65 and 0.70, paired difference (0.2 - 0.1) / 2.
    assert "| 0.6500 | 0.7000 | +0.0500 (" in row and row.endswith("| 1 / 1 | 0.7000 | 0 |")
    (tmp_path / "a" / "fold_0" / "fold_done.json").unlink()
    none = subprocess.run(cmd + ["--finished-folds"], cwd=REPO, capture_output=True, text=True)
    assert none.returncode != 0 and "no finished fold in common" in none.stderr


def test_compare_cv_takes_a_kept_cv_patients_csv_as_baseline(tmp_path):
    # A kept baseline (results/*.csv) is the cv_patients.csv file itself: P1, P3 in fold 0.
    _write_cv(tmp_path / "kept", {"P1": 0.5, "P2": 0.8, "P3": 0.1})
    kept = str(tmp_path / "kept" / "cv_patients.csv")
    _write_cv(tmp_path / "b", {"P1": 0.7, "P2": 0.7, "P3": 0.4})
    cmd = [sys.executable, "bench/compare_cv.py", kept, str(tmp_path / "b")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("| plain |"))
    # Hand-computed: means 0.4667 and 0.6, paired difference (0.2 - 0.1 + 0.3) / 3.
    assert "| 0.4667 | 0.6000 | +0.1333 (" in row and row.endswith("| 2 / 1 | 0.7000 | 0 |")
    # B still training, fold 0 finished (P1 0.9, P3 0.2): compared on P1 and P3 only.
    _write_fold(tmp_path / "c", 0, {"P1": 0.9, "P3": 0.2})
    _write_fold(tmp_path / "c", 1, {"P2": 0.1}, done=False)
    partial = [sys.executable, "bench/compare_cv.py", kept, str(tmp_path / "c"), "--finished-folds"]
    out = subprocess.run(partial, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Only folds [0]" in out.stdout and "2 patients" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("| plain |"))
    # Hand-computed over P1, P3: means 0.30 and 0.55, paired difference (0.4 + 0.1) / 2.
    assert "| 0.3000 | 0.5500 | +0.2500 (" in row
    bad = tmp_path / "bad.csv"
    bad.write_text("patient,score\nP1,0.5\n")
    cmd[2] = str(bad)
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert (
        refused.returncode != 0
        and "bad.csv: not a cross-validation's patient table" in refused.stderr
    )


def test_compare_cv_averages_the_runs_of_a_side_per_patient(tmp_path):
    # Two seeds on each side; the second baseline seed holds fold 0 only (P1, P3).
    _write_cv(tmp_path / "a0", {"P1": 0.5, "P2": 0.8, "P3": 0.1})
    _write_cv(tmp_path / "a1", {"P1": 0.7, "P3": 0.3}, folds={"P3": 0})
    _write_cv(tmp_path / "b0", {"P1": 0.9, "P2": 0.1, "P3": 0.2})
    _write_fold(tmp_path / "b1", 0, {"P1": 0.6, "P3": 0.5})
    _write_fold(tmp_path / "b1", 1, {"P2": 0.3}, done=False)
    a = ",".join(str(tmp_path / n / "cv_patients.csv") for n in ("a0", "a1"))
    b = f"{tmp_path / 'b0' / 'cv_patients.csv'},{tmp_path / 'b1'}"
    cmd = [sys.executable, "bench/compare_cv.py", a, b, "--finished-folds"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Only folds [0]" in out.stdout and "A: per patient, the mean of its 2 runs" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("| plain |"))
    # By hand over P1, P3: A = (0.6, 0.2), B = (0.75, 0.35): means 0.4 and 0.55, +0.15 each.
    assert "| 0.4000 | 0.5500 | +0.1500 (+0.1500 to +0.1500) | 2 / 0 |" in row
    refused = subprocess.run(cmd[:-1], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode != 0 and "hold different patients: ['P2']" in refused.stderr


def test_resolution_ceiling_round_trip_matches_a_hand_computed_edge():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ceiling", REPO / "bench/resolution_ceiling.py")
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)
    masks = np.zeros((1, 16, 16), np.uint8)
    masks[:, :, :7] = 1  # an edge between columns 6 and 7
    # By hand, halving to 8 (weights 1/8, 3/8, 3/8, 1/8 over input columns 2j-1..2j+2): small
    # column 3 holds 1/2. Thresholded (>= 0.5) it is 1, and back at 16 the edge moves to 8:
    # one column too many per row, Dice 2 * 7 / (7 + 8). Kept soft, the edge comes back at 7.
    binary = ceiling.round_trip(masks, 8)
    assert binary[0, 0].tolist() == [1] * 8 + [0] * 8
    assert lggunet.volume_dice(masks, binary) == pytest.approx(14 / 15)
    np.testing.assert_array_equal(ceiling.round_trip(masks, 8, binary=False), masks)


def test_profile_gpu_classifies_a_hand_written_gpu_module():
    """bench/profile_gpu.py puts each launched instruction of a compiled GPU module in its
    class: cuDNN convolutions by direction, matrix products, reduction and elementwise fusions,
    copies (lines modelled on an H200's bf16 train step). The first computation's body is
    found (a loop fusion calling it is a reduction); an unknown custom call is no product."""
    sys.path[:0] = [str(REPO / "bench"), str(REPO)]
    try:
        import profile_gpu
    finally:
        del sys.path[:2]

    hlo = """HloModule jit_train_fn

%fused_reduce.3 (p: bf16[32,256,256,64]) -> f32[64] {
  %p = bf16[32,256,256,64]{3,2,1,0} parameter(0)
  ROOT %reduce.1 = f32[64]{0} reduce(%p, %c), dimensions={0,1,2}, to_apply=%add
}

ENTRY %main.1 (x: bf16[32,256,256,8]) -> f32[] {
  %cudnn-conv-bias-activation.57 = (bf16[32,256,256,64]{3,2,1,0}, u8[131]{0}) custom-call(%a, %b, %c), window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convBiasActivationForward"
  %cudnn-conv-bw-input.18 = (bf16[32,256,256,128]{3,2,1,0}, u8[131]{0}) custom-call(%d, %e), custom_call_target="__cudnn$convBackwardInput"
  %cudnn-conv-bw-filter.35 = (bf16[64,3,3,128]{3,2,1,0}, u8[3834519]{0}) custom-call(%f, %g), custom_call_target="__cudnn$convBackwardFilter"
  %gemm_fusion_dot.9 = bf16[256,524288]{1,0} fusion(%h, %i), kind=kCustom, calls=%gemm_fusion_dot.9_computation
  %input_reduce_fusion.30 = f32[64]{0} fusion(%j), kind=kInput, calls=%fused_reduce.3
  %loop_reduce_fusion = f32[64]{0} fusion(%j), kind=kLoop, calls=%fused_reduce.3
  %custom-call.108 = (bf16[524288,128]{1,0}, s8[33554432]{0}) custom-call(%o, %q), custom_call_target="__cublas$lt$matmul"
  %custom-call.9 = u32[4]{0} custom-call(%r), custom_call_target="cu_threefry2x32"
  %loop_maximum_fusion = bf16[32,256,256,64]{3,2,1,0} fusion(%k, %l), kind=kLoop, calls=%fused_maximum
  %copy.467 = f32[3,3,3,64]{3,2,1,0} copy(%m)
  ROOT %tuple.1 = (f32[]) tuple(%n)
}
"""  # noqa: E501 (HLO lines as XLA prints them)
    classes = profile_gpu.classify(hlo)
    assert classes["cudnn-conv-bias-activation.57"] == (
        "conv forward",
        "(bf16[32,256,256,64]{3,2,1,0}, u8[131]{0})",
    )
    assert classes["cudnn-conv-bw-input.18"][0] == "conv input gradient"
    assert classes["cudnn-conv-bw-filter.35"][0] == "conv weight gradient"
    assert classes["gemm_fusion_dot.9"][0] == "matrix product"
    assert classes["input_reduce_fusion.30"][0].startswith("reduction fusion")
    assert classes["loop_reduce_fusion"][0].startswith("reduction fusion")
    assert classes["custom-call.108"][0] == "matrix product"
    assert classes["custom-call.9"][0] == "other (custom-call cu_threefry2x32)"
    assert classes["loop_maximum_fusion"][0].startswith("elementwise fusion")
    assert classes["copy.467"][0] == "copy / transpose"


def _write_split(folder, fold, test, done=True):
    import json

    fold_dir = folder / f"fold_{fold}"
    fold_dir.mkdir(parents=True)
    record = {"fingerprint": "f", "source": "s", "patients": {"train": ["T"], "test": test}}
    (fold_dir / "splits.json").write_text(json.dumps(record))
    if done:
        (fold_dir / "fold_done.json").write_text("{}\n")


def test_ensemble_cv_finished_folds_takes_only_folds_every_run_finished(tmp_path):
    """bench/ensemble_cv.py --finished-folds: the test patients of the folds all runs have
    finished, from splits.json; a run whose fold holds other patients is refused."""
    sys.path[:0] = [str(REPO / "bench"), str(REPO)]
    try:
        import ensemble_cv
    finally:
        del sys.path[:2]

    a, b = tmp_path / "a", tmp_path / "b"
    _write_split(a, 0, ["P1", "P2"])
    _write_split(a, 1, ["P3"])
    _write_split(a, 10, ["P9"], done=False)
    _write_split(b, 0, ["P1", "P2"])
    _write_split(b, 1, ["P3"], done=False)  # still training: fold 1 left out
    (b / "fold_x").mkdir()  # not a fold folder
    assert ensemble_cv.same_folds([a, b], only_finished=True) == {"P1": 0, "P2": 0}
    _write_split(tmp_path / "c", 0, ["P1", "P4"])
    with pytest.raises(SystemExit, match="different patients"):
        ensemble_cv.same_folds([a, tmp_path / "c"], only_finished=True)
    _write_split(tmp_path / "d", 2, ["P5"])
    with pytest.raises(SystemExit, match="no finished fold in common"):
        ensemble_cv.same_folds([a, tmp_path / "d"], only_finished=True)
    with pytest.raises(SystemExit, match="e: not found"):
        ensemble_cv.same_folds([a, tmp_path / "e"], only_finished=True)


def test_tumour_contrast_figures_match_a_hand_computed_volume():
    """bench/tumour_contrast.py on a volume whose 10x10 foreground (in a zero frame) is 60%
    100, 30% 120 (normal) and 10% 160 (tumour): mean 112, std sqrt(336); median 100,
    IQR 20 (100 to 120)."""
    sys.path[:0] = [str(REPO / "bench"), str(REPO)]
    try:
        import tumour_contrast
    finally:
        del sys.path[:2]

    values = np.array([100] * 60 + [120] * 30 + [160] * 10, np.uint8).reshape(10, 10)
    images = np.zeros((2, 20, 20, 3), np.uint8)
    images[:, 5:15, 5:15] = values[..., None]
    masks = np.zeros((2, 20, 20), np.uint8)
    masks[:, 5:15, 5:15] = values == 160
    out = tumour_contrast.patient_figures(images, masks)
    assert out["share"] == pytest.approx(0.1)
    std = np.sqrt(336.0)
    for c in range(3):
        assert out[f"zn{c}"] == pytest.approx((100 - 112) / std, abs=1e-5)
        assert out[f"zt{c}"] == pytest.approx((160 - 112) / std, abs=1e-5)
        assert out[f"rn{c}"] == pytest.approx(0.0, abs=1e-6)
        assert out[f"rt{c}"] == pytest.approx(60 / (20 / 1.349), abs=1e-4)


def test_profile_loop_counts_outermost_calls_and_busy_time_by_hand():
    """bench/profile_loop.py's helpers: a jit call nested in one of the same name counts once;
    kernel time is the union of overlapping intervals (hand-counted)."""
    sys.path[:0] = [str(REPO / "bench"), str(REPO)]
    try:
        import profile_loop
    finally:
        del sys.path[:2]

    calls = [(0, 10, "f"), (1, 9, "f"), (12, 14, "g"), (15, 20, "f"), (16, 17, "g")]
    assert profile_loop._outermost(calls) == [
        (0, 10, "f"),
        (12, 14, "g"),
        (15, 20, "f"),
        (16, 17, "g"),
    ]
    # [0, 4] and [2, 6] overlap (6), [6, 7] touches (1), [10, 12] alone (2), inside [10, 12]: 0
    assert profile_loop._union_ns([(2, 6), (0, 4), (6, 7), (10, 12), (10, 11)]) == 9


def test_profile_loop_reads_a_real_trace_of_marked_steps(tmp_path):
    """A real jax.profiler trace of StepWindow.marked over two 'epochs' of two steps (window:
    steps 2-4): each fetch calls jitted `fetch`, each step `step`. Step 2 (fetched before the
    trace) is left out; step 3, marked twice (epoch 1's last, empty fetch and epoch 2's
    first), counts once."""
    import jax
    import ml_collections

    from lggunet import profiling

    sys.path[:0] = [str(REPO / "bench"), str(REPO)]
    try:
        import profile_loop
    finally:
        del sys.path[:2]

    @jax.jit
    def fetch(i):
        return i + 1

    @jax.jit
    def step(x):
        return x * 2

    profile = ml_collections.ConfigDict({"first_step": 2, "steps": 3})
    window = profiling.StepWindow(profile, tmp_path, total=4, done=0)
    state = {"out": None, "number": 1}
    with window:
        for _ in range(2):
            batches = (fetch(i) for i in range(2))
            for batch in window.marked(batches, state["number"], lambda: state["out"]):
                state["out"] = step(batch)
                state["number"] += 1
    figures = profile_loop.loop_profile(profile_loop.find_trace(tmp_path))
    assert figures["steps"] == [3, 4]
    assert figures["jit_calls_per_step"] == {"fetch": 1.0, "step": 1.0}
    assert figures["host_ms_in_step_median"] > 0 and figures["step_period_ms_median"] > 0
    # A gap is charged to the step last launched before it began (hand-made launch times).
    assert profile_loop._step_at(5, [10, 20, 30], [7, 8, 9]) is None
    assert profile_loop._step_at(10, [10, 20, 30], [7, 8, 9]) == 7
    assert profile_loop._step_at(29, [10, 20, 30], [7, 8, 9]) == 8
    assert profile_loop._step_at(99, [10, 20, 30], [7, 8, 9]) == 9


def test_device_screening_ensemble_of_one_model_twice_scores_as_the_model(tiny_config, tmp_path):
    """bench/device_screening.py's ensemble row: the same model averaged with itself scores
    what --mode=evaluate gives it alone; members of other inputs are refused."""
    import json
    import shutil
    import types

    from lggunet import report, train

    sys.path[:0] = [str(REPO / "bench"), str(REPO)]
    try:
        import device_screening
    finally:
        del sys.path[:2]

    config = tiny_config
    config.data.phantom = True
    runs = tmp_path / "runs"
    train.train_and_evaluate(config, str(runs / "a"))
    alone = report.evaluate_run(config, runs / "a", splits=("validation",))
    tta = alone["splits"]["validation"]["variants"]["tta"]["volume_dice"]
    args = types.SimpleNamespace(runs=str(runs), out=str(tmp_path))
    row = device_screening.ensemble_scores("aa", ["a", "a"], args)
    assert row["overrides"] == "ensemble of a,a"
    assert row["tta"] == pytest.approx([tta["mean"], tta["median"]], abs=1e-6)
    shutil.copytree(runs / "a", runs / "b")
    saved = json.loads((runs / "b" / "config.json").read_text())
    saved["data"]["image_size"] = 64
    (runs / "b" / "config.json").write_text(json.dumps(saved))
    row = device_screening.ensemble_scores("ab", ["a", "b"], args)
    assert row == {"run": "ab", "error": "members differ in ['data.image_size']"}


def test_profile_gpu_conv_transpose_variant_is_the_same_up_sampling():
    """bench/profile_gpu.py's candidate up-sampling (`lax.conv_transpose`) gives the model's
    einsum form's result from the same parameters, and the patch is undone on leaving."""
    import jax

    from lggunet import models

    sys.path[:0] = [str(REPO / "bench"), str(REPO)]
    try:
        import profile_gpu
    finally:
        del sys.path[:2]

    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 6))
    original = models.Upsample2x
    variables = original(5).init(jax.random.key(0), x)
    with profile_gpu._ConvTransposeUpsample2x():
        assert models.Upsample2x is not original
        patched = models.Upsample2x(5).apply(variables, x)
    assert models.Upsample2x is original
    np.testing.assert_allclose(patched, original(5).apply(variables, x), rtol=1e-5, atol=1e-5)


def test_host_devices_bench_reads_step_times_from_the_log_by_hand():
    sys.path[:0] = [str(REPO / "bench"), str(REPO)]
    try:
        import host_devices
    finally:
        del sys.path[:2]
    log = [
        "I1129 23:59:50.000000 1 train.py:56] step 40/1134 (epoch 1): loss 0.4, 8.0 images/s\n",
        "I1129 23:59:55.000000 1 train.py:56] Saved a checkpoint\n",
        "I1130 00:00:10.000000 1 train.py:56] step 50/1134 (epoch 1): loss 0.3, 8.0 images/s\n",
    ]
    times = host_devices.step_times(log)
    assert times == {40: 86390.0, 50: 10.0}
    # 10 steps of 16 images in 20 s across midnight: 8 images/s
    assert host_devices.images_per_second(times, 40, 50, batch=16) == pytest.approx(8.0)
