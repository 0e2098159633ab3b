"""The profile window (profile.first_step, profile.steps): the trace starts before the first
step of the window and stops after its last, once that step's work is done; a window cut
short by an error is closed; windows that can never open say so."""

import jax
import ml_collections
import pytest
from absl import logging

from lggunet import profiling


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda d: seen.append(("start", d)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: seen.append(("stop",)))
    monkeypatch.setattr(jax, "block_until_ready", lambda x: seen.append(("wait", x)))
    return seen


def window(tmp_path, first, steps=2, total=10, done=0):
    profile = ml_collections.ConfigDict({"first_step": first, "steps": steps})
    return profiling.StepWindow(profile, tmp_path, total, done)


def test_window_traces_exactly_its_steps_across_epochs(calls, tmp_path):
    w = window(tmp_path, 3)
    state = {"step": 0}
    for epoch_steps in (range(1, 3), range(3, 5), range(5, 7)):  # two steps an epoch
        batches = [f"batch {s}" for s in epoch_steps]
        for batch in w.marked(batches, epoch_steps[0], lambda: f"state {state['step']}"):
            state["step"] += 1
            assert batch == f"batch {state['step']}"
            # the trace is on exactly while steps 3 and 4 run
            assert (("start", str(tmp_path / "tensorboard")) in calls) == (state["step"] >= 3)
            assert (("stop",) in calls) == (state["step"] > 4)
        if state["step"] == 2:  # epoch 1's end (its evaluation) is not traced
            assert calls == []
    assert calls == [("start", str(tmp_path / "tensorboard")), ("wait", "state 4"), ("stop",)]
    w.close()  # closed already: nothing more
    assert len(calls) == 3


def test_window_cut_short_is_closed_once(calls, tmp_path):
    with pytest.raises(KeyboardInterrupt), window(tmp_path, 2, steps=5) as w:
        for step in w.marked(range(1, 11), 1, lambda: None):
            if step == 3:
                raise KeyboardInterrupt
    w.close()
    assert calls == [("start", str(tmp_path / "tensorboard")), ("stop",)]


@pytest.mark.parametrize(
    "first, done, says",
    [(0, 0, None), (11, 0, "beyond the run's last step"), (3, 5, "passed before this session")],
)
def test_windows_that_cannot_open_say_so(calls, tmp_path, monkeypatch, first, done, says):
    warned = []
    for level in ("warning", "info"):
        monkeypatch.setattr(logging, level, lambda msg, *a: warned.append(msg % a))
    w = window(tmp_path, first, steps=3, done=done)
    assert list(w.marked(range(done + 1, 11), done + 1, lambda: None)) == list(range(done + 1, 11))
    assert calls == []
    assert (warned == []) if says is None else (len(warned) == 1 and says in warned[0])


def test_a_trace_that_cannot_start_leaves_training_going(monkeypatch, tmp_path):
    def busy(log_dir):
        raise RuntimeError("Profile has already been started")

    warned = []
    monkeypatch.setattr(jax.profiler, "start_trace", busy)
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warned.append(msg % a))
    w = window(tmp_path, 2)
    assert list(w.marked(range(1, 6), 1, lambda: None)) == [1, 2, 3, 4, 5]
    assert not w.active and len(warned) == 1 and "already been started" in warned[0]
