"""The per-task LoRA strategy (kuavo_train/strategies/lora_per_task.py) on a real four-stage run:
the shared base never changes and is stored under stock keys, earlier adapters never change, so
every earlier task's row of the forgetting matrices repeats its own stage's values exactly;
PEFT's own loader, the inference wrapper and the merged stock exports all act alike.
The tests on the four-stage run are marked slow (`make test-slow`, also run by CI) to keep
`make test` within its time budget."""

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import REPO, TASK_NAMES, final_pretrained, shared, stage_2_killed_and_resumed, tiny_overrides
from safetensors.torch import load_file

from kuavo_train.config.loading import load_run_config

EXTRA = ("strategy=lora_per_task", "strategy.rank=4")
CAMS = ("head_cam_h", "wrist_cam_l", "wrist_cam_r")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, demo_base, demo_data):
    from kuavo_train.training.pipeline import Pipeline

    def build(folder):
        Pipeline(load_run_config(tiny_overrides(folder / "run", demo_base, demo_data, *EXTRA))).run()
        return folder / "run"

    return shared(tmp_path_factory, "lora_run", build)


def _adapter(pretrained, k):
    return load_file(str(pretrained / "adapters" / f"task{k}" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_base_is_frozen_and_stored_under_stock_keys(lora_run, demo_base):
    base = load_file(str(demo_base / "model.safetensors"))
    for k, name in enumerate(TASK_NAMES, start=1):
        pretrained = final_pretrained(lora_run, name)
        saved = load_file(str(pretrained / "model.safetensors"))
        assert saved.keys() == base.keys()
        assert all(torch.equal(saved[n], base[n]) for n in base), f"stage {k} changed the base"
        assert sorted(p.name for p in (pretrained / "adapters").iterdir()) == [f"task{j}" for j in range(1, k + 1)]
        for j in range(1, k):  # earlier adapters are carried over unchanged
            before, now = _adapter(final_pretrained(lora_run, TASK_NAMES[j - 1]), j), _adapter(pretrained, j)
            assert before.keys() == now.keys() and all(torch.equal(before[n], now[n]) for n in now)
        own = _adapter(pretrained, k)
        assert any(float(t.abs().sum()) > 0 for n, t in own.items() if "lora_B" in n), "the adapter did not train"


@pytest.mark.slow
def test_earlier_tasks_rows_repeat_their_own_stage_exactly(lora_run):
    report = json.loads((lora_run / "report.json").read_text())
    for metric in ("val_loss", "action_error"):
        R = report["matrices"][metric]
        for k in range(1, 5):
            for j in range(1, k + 1):
                assert R[k][j - 1] == R[j][j - 1], (metric, k, j)
        assert report["metrics"][metric]["bwt"] == 0.0
    # and the adapters matter: task 1 on its own adapter differs from the untrained base's row
    assert report["matrices"]["val_loss"][1][0] != report["matrices"]["val_loss"][0][0]


@pytest.mark.slow
def test_a_cell_whose_model_did_not_change_is_evaluated_once_and_reused_exactly(lora_run, demo_base, demo_data):
    from kuavo_train.data.features import build_feature_space
    from kuavo_train.data.stats import STATS_FILE, stats_from_json
    from kuavo_train.data.task_data import open_task_data
    from kuavo_train.evaluation import run_evaluation as rev
    from kuavo_train.policy import adapters
    from kuavo_train.run_state import RunState

    ev = json.loads((lora_run / "evaluation.json").read_text())
    keys = {int(r): v["cells"] for r, v in ev["rows"].items()}
    for k in range(1, 5):  # the same episode count in every row here (no closed loop)
        for j in range(1, 5):
            # an earlier task keeps its own stage's cell, a later one the base's (row 0)
            assert keys[k][j - 1] == keys[min(j, k) if j <= k else 0][j - 1], (k, j)
        assert keys[k][k - 1] not in keys[k - 1]  # the task trained in stage k: a new model
    assert len(ev["cells"]) == 8  # 4 on the base, one per adapter
    # reused, and exact: task 1's cell of row 3 computed afresh equals the stored one of row 1
    cfg = load_run_config(tiny_overrides(lora_run, demo_base, demo_data, *EXTRA))
    tasks = {s.task_id: open_task_data(s) for s in cfg.ordered_stages()}
    stats = stats_from_json(json.loads((lora_run / STATS_FILE).read_text()))
    space = build_feature_space(list(tasks.values()), max_state_dim=cfg.policy.max_state_dim,
                                max_action_dim=cfg.policy.max_action_dim)
    policy, pre, post = rev.load_model_row(cfg, 3, RunState.load(lora_run), tasks, stats, space)
    with adapters.for_task(policy, 1):
        fresh = rev._evaluate_task(cfg, 1, tasks[1], policy, pre, post, stats, space, 0)
    stored = ev["cells"][keys[3][0]]
    assert stored["row"] == 1
    assert {m: fresh[m] for m in ("val_loss", "action_error")} == {m: stored[m] for m in ("val_loss", "action_error")}


def raw_obs(batch, seed=0):
    rng = np.random.default_rng(seed)
    obs = {f"observation.images.{c}": rng.integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8) for c in CAMS}
    obs["observation.state"] = rng.normal(size=(batch, 16)).astype(np.float32)
    return obs


@pytest.mark.slow
def test_wrapper_runs_each_row_with_its_tasks_adapter_as_peft_does(lora_run):
    """One checkpoint, switched by language: a batch mixing tasks 1 and 2 gives each row what PEFT's
    own loader (the stock class plus `PeftModel.from_pretrained` of that task's adapter) gives."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from peft import PeftModel

    from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper

    w = SmolVLAPolicyWrapper.from_pretrained(lora_run, seed=0)
    mixed = w.predict_action_chunk({**raw_obs(2), "task": w.instructions[:2]})
    pretrained = final_pretrained(lora_run, TASK_NAMES[-1])
    noise = torch.randn((2, w.config.chunk_size, w.config.max_action_dim), generator=torch.Generator().manual_seed(0))
    for row, k in enumerate((1, 2)):
        peft_model = PeftModel.from_pretrained(SmolVLAPolicy.from_pretrained(str(pretrained)),
                                               str(pretrained / "adapters" / f"task{k}")).eval()
        batch, _ = w.to_batch({**raw_obs(2), "task": w.instructions[:2]})
        one = {key: (v[row:row + 1] if torch.is_tensor(v) else v[row:row + 1]) for key, v in batch.items()}
        with torch.no_grad():
            theirs = w.postprocessor(peft_model.base_model.model.predict_action_chunk(
                w.preprocessor(one), noise=noise[row:row + 1]))
        assert torch.allclose(mixed[row], theirs[0, :, : mixed.shape[-1]], atol=1e-5), k
    assert not torch.allclose(mixed[0], mixed[1])


@pytest.mark.slow
def test_export_merged_writes_one_stock_checkpoint_per_task(lora_run, python_exe, tmp_path):
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from kuavo_train.policy import adapters, factory

    out = tmp_path / "merged"
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "export-merged", str(lora_run), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "adapter size per task: task1" in r.stdout
    pretrained = final_pretrained(lora_run, TASK_NAMES[-1])
    cfg = factory.read_pretrained_config(pretrained)
    ours = factory.load_policy(pretrained, cfg).eval()
    layers = {p: m for p, m in ours.named_modules() if m in adapters.lora_layers(ours)}
    base = load_file(str(pretrained / "model.safetensors"))
    for k, name in enumerate(TASK_NAMES, start=1):
        merged_dir = out / name / "pretrained_model"
        assert not (merged_dir / "adapters").exists()
        assert json.loads((merged_dir / "kuavo_tasks.json").read_text())["tasks"][0]["task_id"] == k
        stock = SmolVLAPolicy.from_pretrained(str(merged_dir)).eval()
        merged = load_file(str(merged_dir / "model.safetensors"))
        assert merged.keys() == base.keys()
        changed = {n for n in base if not torch.equal(merged[n], base[n])}
        assert changed and changed <= {f"{p}.weight" for p in layers}  # only the adapted layers differ
        # each adapted layer of the stock model computes what the base layer with the task's adapter does
        with adapters.for_task(ours, k), torch.no_grad():
            for path, layer in layers.items():
                x = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(k))
                assert torch.allclose(layer(x), stock.get_submodule(path)(x), atol=1e-5), (name, path)


@pytest.mark.parametrize("override, problem", [("strategy.rank=0", "strategy.rank: must be > 0"),
                                               ("strategy.dropout=-0.1", "strategy.dropout: must be >= 0"),
                                               ("strategy.targets=all", "strategy.targets: unknown value 'all'")])
def test_a_bad_option_is_one_line_naming_the_strategy_file(override, problem):
    from kuavo_train.config.schema import ConfigError
    from kuavo_train.strategies import get_strategy

    with pytest.raises(ConfigError) as e:
        get_strategy(load_run_config(["strategy=lora_per_task", override]))
    assert problem in str(e.value) and "configs/policy/strategy/lora_per_task.yaml" in str(e.value)
    assert "\n" not in str(e.value)


def test_expert_all_linear_adapts_every_linear_layer_of_the_expert_and_reloads(demo_base, tmp_path):
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from peft.tuners.lora import LoraLayer

    from kuavo_train.policy import adapters

    def wrapped(policy):
        return {n for n, m in policy.named_modules() if isinstance(m, LoraLayer)}

    default, wide, fresh = (SmolVLAPolicy.from_pretrained(demo_base) for _ in range(3))
    adapters.add_adapter(default, "task1", adapters.lora_config(default, rank=4, alpha=8.0))
    adapters.add_adapter(wide, "task1", adapters.lora_config(wide, rank=4, alpha=8.0, targets="expert_all_linear"))
    expert = {n for n in wrapped(wide) if ".lm_expert." in n}
    assert {n.rsplit(".", 1)[1] for n in expert} == {f"{k}_proj" for k in ("q", "k", "v", "o", "gate", "up", "down")}
    assert wrapped(default) < wrapped(wide)  # SmolVLA's own targets, and more
    assert wrapped(wide) - expert == wrapped(default) - expert  # outside the expert: the same projections
    torch.manual_seed(0)
    for name, p in wide.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    adapters.save(wide, tmp_path)
    assert adapters.load(fresh, tmp_path) == ["task1"]
    assert wrapped(fresh) == wrapped(wide)
    ours, theirs = dict(wide.named_parameters()), dict(fresh.named_parameters())
    assert all(torch.equal(ours[n], theirs[n]) for n in ours if "lora_" in n)


@pytest.mark.slow
def test_kill_in_stage_2_and_resume_matches_uninterrupted_run(tmp_path, demo_base, demo_data, python_exe):
    """The resumed stage reloads adapters 1 and 2 from `last` (it must not add task 2's again) and ends
    with the uninterrupted run's adapters, bit for bit."""

    ref, cut = stage_2_killed_and_resumed(tmp_path, python_exe, demo_base, demo_data, *EXTRA)
    a, b = (final_pretrained(d, TASK_NAMES[1]) for d in (ref, cut))
    for k in (1, 2):
        x, y = _adapter(a, k), _adapter(b, k)
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)


def test_one_rate_for_every_adapter_scaled_from_the_rule_unless_given():
    from kuavo_train.strategies import get_strategy

    sizes = {k: 100 for k in range(1, 5)}
    cfg = load_run_config(["profile=demo", "strategy=lora_per_task", "learning_rate.base_lr=2e-4"])
    plans = get_strategy(cfg).plan(sizes)
    assert [p.lr for p in plans] == [10 * 2e-4] * 4 and "lr_scale 10" in plans[0].lr_source
    assert [p.weights for p in plans] == [{k: 1.0} for k in range(1, 5)]
    assert [(p.stage.resume_from, p.stage.resume_task_id) for p in plans] == [("pretrained", None)] + [("task", k) for k in range(1, 4)]
    given = get_strategy(load_run_config(["profile=demo", "strategy=lora_per_task", "strategy.lr=0.003"])).plan(sizes)
    assert [p.lr for p in given] == [0.003] * 4 and given[0].lr_source == "strategy.lr of lora_per_task"



def _base_with_an_adapter(demo_base, folder):
    """A copy of the base with one (untrained) per-task adapter saved beside it, as lora_per_task saves."""
    import shutil

    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from kuavo_train.policy import adapters

    shutil.copytree(demo_base, folder)
    policy = SmolVLAPolicy.from_pretrained(folder)
    adapters.add_adapter(policy, "task1", adapters.lora_config(policy, rank=4, alpha=8.0))
    adapters.save(policy, folder)
    return folder

@pytest.mark.slow  # three command-line processes, 30 s
def test_a_model_with_adapters_is_refused_as_a_base_and_exported_only_where_asked(demo_base, demo_data, python_exe,
                                                                                 tmp_path):
    """Loading a lora_per_task checkpoint loads its adapters and leaves only them trainable: as a
    base it would train the old adapters instead of what the strategy says. export-merged of a
    checkpoint (not a run) needs --out: beside it, the next checkpoint of that name would replace
    the export. Both are one line and write nothing."""
    base = _base_with_an_adapter(demo_base, tmp_path / "with_adapters")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def one_line(*args):
        r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
        return r.stderr.strip()

    line = one_line("train", "profile=demo", f"policy.pretrained_path={base}", f"data_root={demo_data}",
                    f"run_dir={tmp_path / 'run'}")
    assert "a model with per-task adapters (strategy lora_per_task) cannot be a base" in line, line
    line = one_line("export-merged", str(base))
    assert "is a checkpoint, not a run directory: say where the merged models go (--out DIR)" in line, line
    line = one_line("export-merged", str(base), "--out", str(tmp_path / "merged"))
    assert "has no kuavo_tasks.json" in line, line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_instruction_no_task_has_runs_the_bare_base_and_says_so(full_run, tmp_path, caplog):
    """With per-task adapters an unknown instruction (allowed) gets no task's adapter: the warning
    says the shared base runs it, not just that it is used."""
    from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper

    base = _base_with_an_adapter(final_pretrained(full_run[1], TASK_NAMES[0]), tmp_path / "with_adapters")
    w = SmolVLAPolicyWrapper.from_pretrained(base, allow_unknown_instructions=True)
    with caplog.at_level("WARNING"):
        w._instructions({"task": ["pick it up"]})
    assert "used anyway (allow_unknown_instructions); the shared base runs it, without any task's adapter" in caplog.text
