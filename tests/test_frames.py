"""ChunkedFrameDataset returns exactly what stock LeRobotDataset(+delta_timestamps) returns."""

import pytest
import torch

from kuavo_train.data.frames import ChunkedFrameDataset

CAMS = [f"observation.images.{c}" for c in ("head_cam_h", "wrist_cam_l", "wrist_cam_r")]
REPO_ID = "kuavo_demo/task3_placement"


def _root(demo_data):
    return demo_data / "task3_placement"


@pytest.mark.parametrize("chunk", [4, 60])  # shorter and longer than an episode
def test_equal_to_stock_sample_by_sample(demo_data, chunk):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    eps = [4, 1]
    stock = LeRobotDataset(REPO_ID, root=_root(demo_data), episodes=eps, delta_timestamps={"action": [i / 10 for i in range(chunk)]})
    ours = ChunkedFrameDataset(REPO_ID, _root(demo_data), episodes=eps, chunk_size=chunk, camera_keys=CAMS)
    assert len(ours) == len(stock)
    where = {(int(ours[i]["episode_index"]), int(ours[i]["frame_index"])): i for i in range(len(ours))}
    assert set(where) == {(int(stock[j]["episode_index"]), int(stock[j]["frame_index"])) for j in range(len(stock))}
    padded = 0
    for j in range(len(stock)):
        s = stock[j]
        o = ours[where[(int(s["episode_index"]), int(s["frame_index"]))]]
        for key in [*CAMS, "observation.state", "action", "action_is_pad", "timestamp", "frame_index", "episode_index", "index", "task_index"]:
            assert o[key].dtype == s[key].dtype and torch.equal(o[key], s[key]), key
        assert o["task"] == s["task"]
        padded += int(o["action_is_pad"].any())
    assert padded > 0  # the end-of-episode padding was exercised


def test_video_stored_equal_to_stock(demo_data, tmp_path):
    """Video-stored cameras go through LeRobot's decoder: same frames as the stock class, lossy codec or not."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from kuavo_train.data.storage import copy_as_video

    root = copy_as_video(_root(demo_data), tmp_path / "video", episodes=[1, 0])
    stock = LeRobotDataset("local/video", root=root, delta_timestamps={"action": [i / 10 for i in range(6)]})
    ours = ChunkedFrameDataset("local/video", root, episodes=[0, 1], chunk_size=6, camera_keys=CAMS)
    assert ours.video_keys == CAMS and len(ours) == len(stock) > 0
    for i in range(0, len(ours), 7):
        o, s = ours[i], stock[i]
        for key in [*CAMS, "observation.state", "action", "action_is_pad", "index"]:
            assert o[key].dtype == s[key].dtype and torch.equal(o[key], s[key]), key
    # And the video frames are the recorded images up to codec error, not something else.
    images = ChunkedFrameDataset(REPO_ID, _root(demo_data), episodes=[1], chunk_size=1, camera_keys=CAMS)
    assert (ours[0][CAMS[0]] - images[0][CAMS[0]]).abs().mean() < 0.05


def test_episode_order_task_override_and_index_array(demo_data):
    ds = ChunkedFrameDataset(REPO_ID, _root(demo_data), episodes=[2, 0], chunk_size=5, camera_keys=CAMS,
                             task="do it", task_id=3)
    eps = ds.episode_index_array()
    assert len(eps) == len(ds) and eps[0] == 2 and eps[-1] == 0 and (eps[:-1] <= eps[1:]).sum() == len(ds) - 2
    item = ds[0]
    assert item["task"] == "do it" and int(item["task_id"]) == 3


def _same_batches(xs, ys):
    assert len(xs) == len(ys) > 1
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            assert (x[k] == y[k]) if isinstance(x[k], list) else torch.equal(x[k], y[k]), k


def test_workers_and_cache_give_the_same_batches(demo_data):
    from torch.utils.data import DataLoader

    plain = ChunkedFrameDataset(REPO_ID, _root(demo_data), episodes=[0, 1], chunk_size=5, camera_keys=CAMS)
    a = list(DataLoader(plain, batch_size=7, num_workers=0))
    _same_batches(list(DataLoader(plain, batch_size=7, num_workers=2)), a)
    for size in (True, 16):  # room for every image, and a small one that evicts
        cached = ChunkedFrameDataset(REPO_ID, _root(demo_data), episodes=[0, 1], chunk_size=5, camera_keys=CAMS,
                                     image_cache=size)
        # Pass 1 fills the image cache, pass 2 reads from it (num_workers=0: the same object): both must equal `a`.
        _same_batches(list(DataLoader(cached, batch_size=7)), a)
        assert len(cached._images) == (len(cached) * len(CAMS) if size is True else size)
        _same_batches(list(DataLoader(cached, batch_size=7)), a)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"episodes": [99]}, "episode 99 does not exist"),
    ({"camera_keys": ["observation.images.chest"]}, "no feature 'observation.images.chest'"),
])
def test_bad_inputs(demo_data, kwargs, fragment):
    args = {"episodes": [0], "chunk_size": 5, "camera_keys": CAMS, **kwargs}
    with pytest.raises(ValueError) as e:
        ChunkedFrameDataset(REPO_ID, _root(demo_data), **args)
    assert fragment in str(e.value) and "\n" not in str(e.value)
