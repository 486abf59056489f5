"""Tasks with different state/action vectors in one policy: the union space, its stats and the masked loss."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kuavo_train.data.features import build_feature_space
from kuavo_train.data.frames import DIM_PAD_KEY, ChunkedFrameDataset, VectorLayout
from kuavo_train.data.task_data import ACTION_KEY, STATE_KEY, DataError, TaskData
from kuavo_train.policy import factory
from kuavo_train.policy.masked import MaskedSmolVLAPolicy

ARM = [f"zarm_l{i}" for i in range(1, 8)] + ["left_claw"] + [f"zarm_r{i}" for i in range(1, 8)] + ["right_claw"]
BASE = ["cmd_pos_x", "cmd_pos_y", "cmd_pos_yaw", "ctrl_change_cmd"]


def _task(tid, action_names, state_names=ARM, *, named=True):
    feats = {STATE_KEY: {"dtype": "float32", "shape": (len(state_names),), "names": state_names if named else None},
             ACTION_KEY: {"dtype": "float32", "shape": (len(action_names),), "names": action_names if named else None}}
    return TaskData(task_id=tid, name=f"task{tid}", instruction=f"do {tid}", repo_id=f"t/{tid}", root=Path(f"/d/{tid}"),
                    fps=10, features=feats, camera_keys=("observation.images.head_cam_h",), train_episodes=(0,),
                    val_episodes=(1,), dataset_tasks=())


def test_union_order_is_first_task_then_new_names_in_task_order():
    space = build_feature_space([_task(2, ARM + BASE), _task(1, ARM)], max_state_dim=32, max_action_dim=32)
    assert space.names[ACTION_KEY] == tuple(ARM + BASE)
    assert space.index[1][ACTION_KEY] == tuple(range(16))
    assert space.index[2][ACTION_KEY] == tuple(range(20))
    assert not space.is_uniform()
    # a later task whose dims come in another order is matched by name, not position
    shuffled = BASE[::-1] + ARM
    space = build_feature_space([_task(1, ARM), _task(2, shuffled)], max_state_dim=32, max_action_dim=32)
    assert [space.names[ACTION_KEY][i] for i in space.index[2][ACTION_KEY]] == shuffled
    assert build_feature_space([_task(1, ARM), _task(2, ARM)], max_state_dim=32, max_action_dim=32).is_uniform()



def test_a_joint_named_after_its_link_is_the_same_dim_and_disjoint_names_are_warned(caplog):
    """Leju's converter names the arm dims after their URDF links (zarm_l1_link), ours after the
    joints (zarm_l1): datasets of both kinds share their dims. Same-size tasks sharing under half
    of their names are said (a union twice as wide, most likely not meant)."""
    links = [n if "claw" in n else f"{n}_link" for n in ARM]
    space = build_feature_space([_task(1, ARM), _task(2, links + BASE, links)], max_state_dim=32, max_action_dim=32)
    assert space.names[ACTION_KEY] == tuple(ARM + BASE) and space.names[STATE_KEY] == tuple(ARM)
    assert space.index[2][ACTION_KEY] == tuple(range(20)) and space.index[2][STATE_KEY] == tuple(range(16))
    assert space.task_names[2][ACTION_KEY] == tuple(links + BASE)  # each task keeps its own names
    assert not caplog.records
    other = [f"joint{i}" for i in range(16)]
    with caplog.at_level("WARNING"):
        space = build_feature_space([_task(1, ARM), _task(2, other, other)], max_state_dim=32, max_action_dim=32)
    assert space.dim(ACTION_KEY) == 32
    assert any("tasks task1 and task2: 16 dims each, only 0 with the same name (zarm_l1, zarm_l2... against "
               "joint0, joint1...)" in r.getMessage() for r in caplog.records), caplog.text

def test_unnamed_dims_of_different_sizes_are_refused():
    with pytest.raises(DataError, match=r"stages\.task2\.dataset\.root: action of /d/2 has no per-dim names"):
        build_feature_space([_task(1, ARM), _task(2, ARM + BASE, named=False)], max_state_dim=32, max_action_dim=32)


def test_union_above_max_dim_is_refused():
    with pytest.raises(DataError, match=r"policy\.max_action_dim: the tasks need a 20-dim action in all"):
        build_feature_space([_task(1, ARM), _task(2, ARM + BASE)], max_state_dim=32, max_action_dim=18)


def test_layout_scatters_own_dims_and_fills_the_rest():
    fill = np.arange(20, dtype=np.float32) + 100
    lay = VectorLayout(tuple(range(16)), fill)
    out = lay.scatter(np.ones((3, 16), dtype=np.float32))
    assert out.shape == (3, 20) and (out[:, :16] == 1).all() and (out[:, 16:] == fill[16:]).all()
    assert lay.mask().tolist() == [True] * 16 + [False] * 4


@pytest.fixture(scope="module")
def policy_and_batch(demo_base, demo_data):
    """The real tiny SmolVLA widened to a 20-dim action, and a real demo-world batch of 16-dim task data."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    from kuavo_train.data.features import union_features

    task_name = "task1_moving_grasp"
    root = demo_data / task_name
    meta = LeRobotDatasetMetadata("t/1", root=root)
    task = TaskData(task_id=1, name=task_name, instruction="grasp", repo_id="t/1", root=root, fps=10,
                    features=dict(meta.features), camera_keys=tuple(meta.camera_keys), train_episodes=(0,),
                    val_episodes=(3,), dataset_tasks=(), camera_map={k: k for k in meta.camera_keys})
    walker = replace(task, task_id=2, features={**task.features, ACTION_KEY: {"dtype": "float32", "shape": (20,), "names": ARM + BASE}})
    space = build_feature_space([task, walker], max_state_dim=32, max_action_dim=32)
    cfg = factory.read_pretrained_config(demo_base)
    inputs, outputs = factory.policy_features(union_features(space, task, task.camera_map), list(task.camera_map),
                                              STATE_KEY, ACTION_KEY)
    cfg.input_features, cfg.output_features = inputs, outputs
    policy = factory.load_policy(demo_base, cfg)
    stats = {k: {s: np.asarray(v, dtype=np.float32) for s, v in meta.stats[k].items()} for k in (STATE_KEY,)}
    a = meta.stats[ACTION_KEY]
    stats[ACTION_KEY] = {s: np.concatenate([np.asarray(a[s], dtype=np.float32).reshape(-1), np.full(4, 0.5 if s != "count" else 1, np.float32)])
                         if s != "count" else np.asarray(a[s]) for s in a}
    pre, _ = factory.make_processors(policy.config, stats=stats)
    lay = VectorLayout(space.index[1][ACTION_KEY], stats[ACTION_KEY]["mean"])
    ds = ChunkedFrameDataset("t/1", root, episodes=[0, 1], chunk_size=policy.config.chunk_size,
                             camera_keys=list(meta.camera_keys), task="grasp", task_id=1, action_layout=lay)
    raw = torch.utils.data.default_collate([ds[i] for i in (0, 5, 9, 20)])
    return policy, pre, raw


def _loss(policy, pre, raw, *, reduction="mean"):
    g = torch.Generator().manual_seed(0)
    n, cfg = len(raw["task"]), policy.config
    noise = torch.randn(n, cfg.chunk_size, cfg.max_action_dim, generator=g)
    time = torch.rand(n, generator=g) * 0.9 + 0.05
    batch = pre(dict(raw))
    assert DIM_PAD_KEY in batch, "the preprocessor must pass the dim mask through"
    return policy.forward(batch, noise=noise.clone(), time=time.clone(), reduction=reduction)[0]


def test_masked_loss_averages_only_each_samples_own_dims(policy_and_batch):
    """The loss is the flow-matching error over own dims and valid steps only (absent dims are
    filled with the union mean, i.e. 0 after normalization, like SmolVLA's own padding)."""
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    policy, pre, raw = policy_and_batch
    assert raw[DIM_PAD_KEY].shape == (4, 20) and raw[DIM_PAD_KEY][:, 16:].all() and not raw[DIM_PAD_KEY][:, :16].any()
    g = torch.Generator().manual_seed(0)
    n, cfg = len(raw["task"]), policy.config
    noise = torch.randn(n, cfg.chunk_size, cfg.max_action_dim, generator=g)
    time = torch.rand(n, generator=g) * 0.9 + 0.05
    batch = pre(dict(raw))
    assert bool((batch["action"][..., 16:] == 0).all()), "absent dims normalize to 0"
    images, img_masks = policy.prepare_images(batch)
    elem = policy.model.forward(images, img_masks, batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK],
                                policy.prepare_state(batch), policy.prepare_action(batch), noise.clone(), time.clone())
    valid = (~raw["action_is_pad"]).unsqueeze(-1).float()
    own = (elem[:, :, :16] * valid).sum() / (valid.sum() * 16)
    everything = (elem[:, :, :20] * valid).sum() / (valid.sum() * 20)
    loss = _loss(policy, pre, raw)
    torch.testing.assert_close(loss, own, rtol=1e-6, atol=1e-7)
    assert not torch.isclose(loss, everything)
    per_sample = _loss(policy, pre, raw, reduction="none")
    torch.testing.assert_close(per_sample, (elem[:, :, :16] * valid).sum((1, 2)) / (valid.sum((1, 2)) * 16), rtol=1e-6, atol=1e-7)


def test_no_padded_dim_is_exactly_the_stock_forward(policy_and_batch):
    policy, pre, raw = policy_and_batch
    full = dict(raw)
    full[DIM_PAD_KEY] = torch.zeros_like(raw[DIM_PAD_KEY])
    stock = dict(raw)
    del stock[DIM_PAD_KEY]
    assert isinstance(policy, MaskedSmolVLAPolicy)
    for reduction in ("mean", "none"):
        assert torch.equal(_loss(policy, pre, full, reduction=reduction),
                           _loss_stock(policy, pre, stock, reduction=reduction))


def _loss_stock(policy, pre, raw, *, reduction):
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    g = torch.Generator().manual_seed(0)
    n, cfg = len(raw["task"]), policy.config
    noise = torch.randn(n, cfg.chunk_size, cfg.max_action_dim, generator=g)
    time = torch.rand(n, generator=g) * 0.9 + 0.05
    return SmolVLAPolicy.forward(policy, pre(dict(raw)), noise=noise, time=time, reduction=reduction)[0]


def test_cameras_per_task_default_rgb_optin_depth_and_refusal():
    from types import SimpleNamespace

    from kuavo_train.data.task_data import resolve_cameras

    have = ("observation.images.head_cam_h", "observation.images.wrist_cam_l", "observation.depth_h")
    stage = SimpleNamespace(name="task4_sorting", cameras=None)
    assert resolve_cameras(stage, have, Path("/d/4"), "t4.yaml") == {
        "observation.images.head_cam_h": "observation.images.head_cam_h",
        "observation.images.wrist_cam_l": "observation.images.wrist_cam_l"}
    stage.cameras = {"head": "head_cam_h", "depth_h": "observation.depth_h"}
    assert resolve_cameras(stage, have, Path("/d/4"), "t4.yaml") == {
        "observation.images.head": "observation.images.head_cam_h", "observation.images.depth_h": "observation.depth_h"}
    # one order for every stage, whatever the dataset's or the config's: SmolVLA knows a camera by its place
    assert list(resolve_cameras(stage, have[::-1], Path("/d/4"), "t4.yaml")) == [
        "observation.images.depth_h", "observation.images.head"]
    stage.cameras = None
    assert list(resolve_cameras(stage, have[::-1], Path("/d/4"), "t4.yaml")) == [
        "observation.images.head_cam_h", "observation.images.wrist_cam_l"]
    stage.cameras = {"wrist_cam_r": "wrist_cam_r"}
    with pytest.raises(DataError) as err:
        resolve_cameras(stage, have, Path("/d/4"), "t4.yaml")
    msg = str(err.value)
    assert "stages.task4_sorting.cameras.wrist_cam_r" in msg and "'wrist_cam_r'" in msg and "head_cam_h" in msg
    assert "\n" not in msg


def test_repeated_instructions_are_tokenized_once_into_the_tokenizers_own_result(demo_base):
    """Our processors keep the tokens of recent batches of instructions (a closed-loop episode sends
    the same one at every step); what they hand out equals the tokenizer's output, call by call,
    and a caller changing its copy changes nothing later."""
    pcfg = factory.read_pretrained_config(demo_base)
    pre, _ = factory.make_processors(pcfg)  # a new pipeline (the base has none saved); its tokenizer is the base's
    step = next(s for s in pre.steps if getattr(s, "input_tokenizer", None) is not None)
    memo = step.input_tokenizer
    tokenizer = memo.tokenizer
    kwargs = dict(max_length=step.max_length, truncation=step.truncation, padding=step.padding,
                  padding_side=step.padding_side, return_tensors="pt")
    short, long = "sort the workpiece", "put the red block on the green square, then weigh it on the white pad"
    calls = [[short] * 3, [short, long, short], [short] * 3, [long], short, [short] * 3]
    for texts in calls:
        got, want = step._tokenize_text(texts), tokenizer(texts, **kwargs)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), texts
        got["input_ids"][..., 0] = -1
    assert len(memo.memo) == 4  # four distinct batches of texts, each tokenized once
    assert step._tokenize_text([short] * 3)["input_ids"].min() >= 0
