"""Training-sample loading: ChunkedFrameDataset vs stock LeRobotDataset (+delta_timestamps).

    .venv/bin/python benchmarks/bench_loader.py [--root outputs/demo/datasets/task1_moving_grasp] [--chunks 10 50]
    .venv/bin/python benchmarks/bench_loader.py --video     # the same frames as 640x480 video

Both loaders read the same dataset through a DataLoader with the same batch
size and the same shuffled order; rounds alternate between them and the median
samples/s of each is reported with the ratio ours/stock. `--video` first writes
a video-stored copy of the first `--video-episodes` episodes with LeRobot's own
dataset writer, upscaled to `--video-size` (640x480 like Kuavo's cameras; under
outputs/bench_loader/, reused while it exists).

A third loader is ours when the frozen-feature cache holds every frame's image
features (every epoch after the first, every replayed frame): the loader then
decodes no image (`feature_cache.verify_digest: false`). Its cache stores are
made with the cache's own code and marked full; only the loader is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def video_copy(src: Path, episodes: int, size: tuple[int, int]) -> Path:
    from kuavo_train.data.storage import copy_as_video

    dst = Path("outputs/bench_loader") / f"{src.name}-video{episodes}-{size[1]}x{size[0]}"
    if (dst / "meta" / "info.json").is_file():
        return dst
    return copy_as_video(src, dst, episodes=list(range(episodes)), repo_id=f"bench/{dst.name}", size=size)


def all_cached(cams: list[str], frames: int, folder: Path):
    """A `CachedFrames` over cache stores that hold every frame of every camera."""
    from kuavo_train.policy.feature_cache import CachedFrames, _Store

    files = []
    for cam in cams:
        st = _Store(folder, cam, frames)
        st.create((1, 1), np.float32)
        st.digests[:] = 0.0  # every entry present
        st.digests.flush()
        files.append(st.digest_path)
    return CachedFrames({0: files})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="outputs/demo/datasets/task1_moving_grasp")
    ap.add_argument("--chunks", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=20, help="batches per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--video", action="store_true", help="benchmark a video-stored copy of the dataset")
    ap.add_argument("--video-episodes", type=int, default=6)
    ap.add_argument("--video-size", type=int, nargs=2, default=[480, 640], metavar=("HEIGHT", "WIDTH"))
    args = ap.parse_args()
    if args.video:
        args.root = str(video_copy(Path(args.root), args.video_episodes, tuple(args.video_size)))

    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from torch.utils.data import DataLoader

    from kuavo_train.data.frames import ChunkedFrameDataset

    root = Path(args.root)
    info = json.loads((root / "meta" / "info.json").read_text())
    repo_id = f"bench/{root.name}"
    fps = info["fps"]
    cams = [k for k, f in info["features"].items() if f["dtype"] in ("image", "video")]
    episodes = list(range(info["total_episodes"]))
    shapes = sorted({tuple(info["features"][c]["shape"]) for c in cams})
    print(f"dataset {root} ({info['total_frames']} frames, cameras {len(cams)} of shape {shapes}, storage "
          f"{sorted({info['features'][c]['dtype'] for c in cams})}), batch {args.batch_size}, workers {args.workers}")
    import tempfile

    cache_dir = Path(tempfile.mkdtemp(prefix="kuavo-bench-loader-"))
    cached = all_cached(cams, info["total_frames"], cache_dir)
    for chunk in args.chunks:
        stock = LeRobotDataset(repo_id, root=root, delta_timestamps={"action": [i / fps for i in range(chunk)]})
        ours = ChunkedFrameDataset(repo_id, root, episodes=episodes, chunk_size=chunk, camera_keys=cams)
        ours_cached = ChunkedFrameDataset(repo_id, root, episodes=episodes, chunk_size=chunk, camera_keys=cams,
                                          cached_frames=cached)
        n = args.batch_size * args.batches

        def rate(ds, seed):
            order = np.random.default_rng(seed).permutation(len(ds))[:n].tolist()
            loader = DataLoader(ds, batch_size=args.batch_size, sampler=order, num_workers=args.workers)
            t = time.perf_counter()
            for _ in loader:
                pass
            return n / (time.perf_counter() - t)

        rate(stock, 99), rate(ours, 99), rate(ours_cached, 99)  # warm-up (file opening, page cache)
        r = {"stock": [], "ours": [], "cached": []}
        for k in range(args.rounds):
            r["stock"].append(rate(stock, k))
            r["ours"].append(rate(ours, k))
            r["cached"].append(rate(ours_cached, k))
        s, o, c = np.median(r["stock"]), np.median(r["ours"]), np.median(r["cached"])
        print(f"chunk {chunk:>3}: stock {s:8.1f} samples/s, ours {o:8.1f} samples/s ({o / s:.1f}x), "
              f"ours on cached frames {c:8.1f} samples/s ({c / s:.1f}x)", flush=True)
    import shutil

    shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
