"""Runs that lose no work: non-finite steps are skipped and never reach a state or export, a
preemption signal saves the state at the next step and exits 0, and a run resumes from it with
the uninterrupted run's losses."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import greedygrow.train as train_module
from greedygrow.checkpoint import nonfinite_tensors
from greedygrow.config import train_core_config
from greedygrow.state import latest_state, list_states, load_state, state_path
from greedygrow.stopping import RunStopped
from greedygrow.train import train
from test_train import TINY, _cli, _losses, uninterrupted


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return f"data.text_cache_dir={tmp_path_factory.mktemp('text-cache')}"


@pytest.fixture
def poison(monkeypatch):
    """poison(steps): the loss of those (0-based) steps is NaN, so are their gradients."""
    real = train_module._loss

    def set_steps(steps: set[int]) -> None:
        def loss(trainable, batch, text, schedule, step):
            value = real(trainable, batch, text, schedule, step)
            return value * float("nan") if step in steps else value

        monkeypatch.setattr(train_module, "_loss", loss)

    return set_steps


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """The state's model, EMA and optimizer tensors, flattened to 'part/key/...' names."""
    out = {}

    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            out[name] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}/{k}")

    for part in ("model", "ema", "optimizer"):
        walk(state[part], part)
    return out


def test_nonfinite_steps_are_skipped_counted_and_change_nothing(tmp_path, cache, poison):
    poison({2, 3})  # the updates after steps 2 and 3 (1-based: 3 and 4) are skipped
    run = tmp_path / "run"
    cfg = [*TINY, "run.steps=6", "run.checkpoint_every=1", "run.keep=10", cache]
    train(train_core_config(None, cfg), run)
    logged = _metrics(run)
    assert [m["skipped_steps"] for m in logged] == [0, 0, 1, 2, 2, 2]
    assert [m["loss"] == m["loss"] for m in logged] == [True, True, False, False, True, True]
    states = dict(list_states(run))
    before, after = (load_state(states[s]) for s in (2, 4))
    a, b = _tensors(before), _tensors(after)
    assert a.keys() == b.keys()
    for name in a:  # weights, EMA, Adam moments and step counts as if the steps never were
        assert torch.equal(a[name], b[name]), name
    moved = _tensors(load_state(states[5]))
    assert any(not torch.equal(moved[n], a[n]) for n in a if n.startswith("model/"))  # step 5 did
    for _, path in states.items():
        assert nonfinite_tensors(load_state(path)) == []
    assert load_state(latest_state(run)[1])["nonfinite_steps"] == 2


def test_nonfinite_stop_policy_ends_the_run_at_the_first_with_a_clear_message(
    tmp_path, cache, poison
):
    poison({3})
    run = tmp_path / "run"
    cfg = [*TINY, "run.steps=8", "run.checkpoint_every=2", "run.nonfinite=stop", cache]
    with pytest.raises(RunStopped, match=r"1 step\(s\) up to step 4 had a non-finite gradient"):
        train(train_core_config(None, cfg), run)
    step, path = latest_state(run)
    state = load_state(path)
    assert step == 2 and nonfinite_tensors(state) == []


def test_a_skip_run_stops_after_patience_nonfinite_steps_in_a_row(tmp_path, cache, poison):
    poison(set(range(2, 100)))
    run = tmp_path / "run"
    cfg = [*TINY, "run.steps=20", "run.nonfinite_patience=3", cache]
    with pytest.raises(RunStopped, match="the 3 steps up to step 5 all had"):
        train(train_core_config(None, cfg), run)


def test_isolated_nonfinite_steps_do_not_stop_a_skip_run(tmp_path, cache, poison):
    poison({1, 3, 5})  # never two in a row
    run = tmp_path / "run"
    cfg = [*TINY, "run.steps=7", "run.log_every=7", "run.nonfinite_patience=2", cache]
    train(train_core_config(None, cfg), run)
    (logged,) = _metrics(run)
    assert logged["skipped_steps"] == 3
    assert logged["loss"] == logged["loss"]  # the mean of the 4 finite losses, not NaN


def test_sigterm_saves_at_the_next_step_exits_0_and_the_rerun_has_the_uninterrupted_losses(
    tmp_path, cache
):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 60
    reference = uninterrupted(tmp_path / "reference", steps, cache)
    run = tmp_path / "preempted"
    proc = subprocess.Popen(
        _cli(run, steps, cache),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not state_path(run, 10).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    stopped_at = max(s for s, _ in list_states(run))
    assert 10 <= stopped_at < steps, "the run finished before the signal"
    assert f"SIGTERM received: training state saved at step {stopped_at}" in stderr
    wall = json.loads((run / "model.json").read_text())["compute"]["phase"]["wall_s"]
    done = subprocess.run(_cli(run, steps, cache), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run} from step {stopped_at}" in done.stderr
    assert _losses(run) == _losses(reference)
    assert json.loads((run / "model.json").read_text())["compute"]["phase"]["wall_s"] > wall


def test_a_grow_from_an_unfinished_core_is_refused(tmp_path, cache):
    from greedygrow.config import ConfigError, grow_config
    from test_train import GROW

    core = tmp_path / "core"
    train(train_core_config(None, [*TINY, "run.steps=2", cache]), core)
    config = core / "config.yaml"  # as if preempted at step 2 of 4
    config.write_text(config.read_text().replace("  steps: 2\n", "  steps: 4\n"))
    grown = grow_config(str(core), 16, "greedy", None, None, [*GROW, "run.steps=1", cache])
    with pytest.raises(ConfigError, match="trained to step 2 of its 4: rerun its train-core"):
        train(grown, tmp_path / "grown")


def test_the_preemption_flag_is_only_set_by_the_handler():
    from greedygrow.distributed import Env
    from greedygrow.stopping import Preemption

    with Preemption(Env(0, 1, torch.device("cpu"))) as preemption:
        assert preemption.requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored
