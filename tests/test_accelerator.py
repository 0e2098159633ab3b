"""What keeps an accelerator busy: steps compiled once per run (also across a resume), no
host wait on the step just dispatched, asynchronous checkpoints."""

from __future__ import annotations

import collections
import json

import jax
import jax.monitoring
import pytest

_COMPILES: collections.Counter = collections.Counter()
_LISTENING = False


def _count_compiles() -> collections.Counter:
    """Backend compilations by function name, from jax's monitoring events (one listener for
    the session: jax cannot unregister one)."""
    global _LISTENING
    if not _LISTENING:

        def listen(event: str, duration: float, **kwargs) -> None:
            if event == "/jax/core/compile/backend_compile_duration":
                _COMPILES[kwargs.get("fun_name", "?")] += 1

        jax.monitoring.register_event_duration_secs_listener(listen)
        _LISTENING = True
    _COMPILES.clear()
    return _COMPILES


def _ours(counts: collections.Counter) -> dict[str, int]:
    names = ("train_fn", "eval_step", "predict_step", "<lambda>")
    return {k: v for k, v in counts.items() if any(n in k for n in names)}


def test_steps_compile_once_per_run_and_after_a_resume(tiny_config, tmp_path):
    from lggunet import train

    tiny_config.num_epochs = 2
    counts = _count_compiles()
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    fresh = _ours(counts)
    assert fresh.get("jit(train_fn)") == 1, fresh
    assert fresh.get("jit(eval_step)") == 1, fresh  # epochs and the final evaluation
    assert fresh.get("jit(predict_step)") == 1, fresh
    tiny_config.num_epochs = 3  # resume: a restored state has the same types
    counts.clear()
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    resumed = _ours(counts)
    assert resumed.get("jit(train_fn)") == 1, resumed
    assert resumed.get("jit(eval_step)") == 1, resumed

    from lggunet import report  # --mode=evaluate: 3 splits, plain and TTA, 2 compilations

    report._compiled_eval.cache_clear()
    counts.clear()
    scored = report.evaluate_run(tiny_config, tmp_path / "run")
    assert set(scored["splits"]) == {"train", "validation", "test"}
    assert _ours(counts).get("jit(eval_step)") == 2, _ours(counts)


def test_the_step_counter_is_a_strong_int32(tiny_config):
    from lggunet import parallel, steps

    state, _ = steps.initial_state(tiny_config, parallel.data_mesh())
    assert state.step.dtype == jax.numpy.int32 and not state.step.weak_type


def test_step_outputs_are_read_one_step_late_in_order():
    """The host reads step k-1's metrics after dispatching step k (lag 1), all of them by the
    end; with lag 0 (XLA CPU, several devices) it reads each step at once."""
    from lggunet import history

    read = []
    reader = history.LateReader(lambda step, out: read.append((step, out["loss"])), lag=1)
    reader.push(1, {"loss": 0.5})
    assert read == []  # step 1 still runs: not waited for
    reader.push(2, {"loss": 0.4})
    assert read == [(1, 0.5)]
    reader.push(3, {"loss": 0.3})
    reader.flush()
    assert read == [(1, 0.5), (2, 0.4), (3, 0.3)]
    now = []
    eager = history.LateReader(lambda step, out: now.append(step), lag=0)
    eager.push(7, {"loss": 0.1})
    assert now == [7]


def test_one_host_read_per_step_and_pictures_every_n_epochs(tiny_config, tmp_path, monkeypatch):
    """Per train step the host makes one read of metrics (the step before's); pictures are
    drawn every summary_every_epochs."""
    from lggunet import history, summaries, train

    reads, drawn = [], []
    real_read = history.LateReader._read
    monkeypatch.setattr(
        history.LateReader, "_read", lambda self: reads.append(1) or real_read(self)
    )
    real_draw = summaries.draw_validation
    monkeypatch.setattr(
        summaries, "draw_validation", lambda *a, **k: drawn.append(a[5]) or real_draw(*a, **k)
    )
    tiny_config.num_epochs = 4
    tiny_config.summary_every_epochs = 2
    tiny_config.log_every_steps = 1000
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    total_steps = records[-1]["step"]
    assert len(reads) == total_steps  # one read per step
    assert drawn == [records[1]["step"], records[3]["step"]]  # epochs 2 and 4


if __name__ == "__main__":
    pytest.main([__file__])
