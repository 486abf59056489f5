"""The EWC strategy (kuavo_train/strategies/ewc.py): its options are checked in one line, its state
(Fisher information and anchor weights) travels from stage to stage inside the checkpoints, and
its penalty holds the weights that mattered for task 1 where task 1 left them."""

import subprocess

import pytest
import torch
from conftest import REPO, TASK_NAMES, tiny_overrides
from safetensors.torch import load_file

from kuavo_train.config.loading import load_run_config


def test_a_bad_option_is_one_line_naming_the_strategy_file(python_exe, tmp_path, demo_base, demo_data):
    run_dir = tmp_path / "run"
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "train",
                        *tiny_overrides(run_dir, demo_base, demo_data, "strategy=ewc", "strategy.ewc_lambda=-1")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "strategy.ewc_lambda: must be >= 0" in lines[0], r.stderr
    assert "configs/policy/strategy/ewc.yaml" in lines[0]
    assert not run_dir.exists()


def _two_stages(run_dir, demo_base, demo_data, ewc_lambda: float):
    from kuavo_train.training.pipeline import Pipeline

    for task in TASK_NAMES[:2]:  # two invocations: stage 2 gets stage 1's state only through its checkpoint
        cfg = load_run_config(tiny_overrides(run_dir, demo_base, demo_data, "strategy=ewc",
                                             f"strategy.ewc_lambda={ewc_lambda}", f"task=tasks/{task}",
                                             "evaluation.after_each_stage=false", "stages.task2_weighing.max_epoch=3"))
        Pipeline(cfg).run()
    return run_dir


def _final(run_dir, i: int):
    return run_dir / f"stage{i}_{TASK_NAMES[i - 1]}" / "checkpoints" / "last"


def test_penalty_keeps_what_task_1_needed(tmp_path, demo_base, demo_data):
    free = _two_stages(tmp_path / "free", demo_base, demo_data, 0.0)
    held = _two_stages(tmp_path / "held", demo_base, demo_data, 1e7)
    state = load_file(str(_final(held, 1) / "strategy_state_final.safetensors"))
    fisher = {k[len("fisher."):]: v for k, v in state.items() if k.startswith("fisher.")}
    anchor = {k[len("anchor."):]: v for k, v in state.items() if k.startswith("anchor.")}
    assert fisher and set(fisher) == set(anchor) and all(float(f.sum()) > 0 for f in fisher.values())
    # the anchor is task 1's final model, and stage 2 started from that state
    task1 = load_file(str(_final(held, 1) / "pretrained_model" / "model.safetensors"))
    assert all(torch.equal(anchor[n], task1[n].float()) for n in anchor)
    assert load_file(str(_final(held, 2) / "strategy_state.safetensors")).keys() == state.keys()
    # both runs' stage 1 is the same (no penalty yet); in stage 2 the penalty holds the weights
    assert all(torch.equal(task1[n], load_file(str(_final(free, 1) / "pretrained_model" / "model.safetensors"))[n])
               for n in anchor)

    def drift(run):
        w = load_file(str(_final(run, 2) / "pretrained_model" / "model.safetensors"))
        return sum(float((fisher[n] * (w[n].float() - anchor[n]) ** 2).sum()) for n in fisher)

    assert drift(held) < 0.5 * drift(free), (drift(held), drift(free))
    # its end-of-stage state adds task 2's Fisher to task 1's
    end2 = load_file(str(_final(held, 2) / "strategy_state_final.safetensors"))
    assert all(float(end2[f"fisher.{n}"].sum()) > float(fisher[n].sum()) for n in fisher)


@pytest.mark.parametrize("value", ["-1", "x"])
def test_fisher_batches_must_be_a_count(value):
    from kuavo_train.config.schema import ConfigError
    from kuavo_train.strategies import get_strategy

    with pytest.raises(ConfigError) as e:
        get_strategy(load_run_config(["strategy=ewc", f"strategy.fisher_batches={value}"]))
    assert "strategy.fisher_batches" in str(e.value) and "ewc.yaml" in str(e.value)


@pytest.mark.slow
def test_kill_in_stage_2_and_resume_matches_uninterrupted_run(tmp_path, demo_base, demo_data, python_exe):
    """The resumed stage reloads the Fisher information and anchor from `last` and ends with the
    uninterrupted run's weights and state, bit for bit."""
    from conftest import final_pretrained, stage_2_killed_and_resumed

    ref, cut = stage_2_killed_and_resumed(tmp_path, python_exe, demo_base, demo_data, "strategy=ewc",
                                          "strategy.ewc_lambda=1e7")
    a, b = (load_file(str(final_pretrained(d, TASK_NAMES[1]) / "model.safetensors")) for d in (ref, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    x, y = (load_file(str(_final(d, 2) / "strategy_state_final.safetensors")) for d in (ref, cut))
    assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
