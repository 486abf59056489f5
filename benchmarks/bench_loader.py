"""Training-sample loading: ChunkedFrameDataset vs stock LeRobotDataset (+delta_timestamps).

    .venv/bin/python benchmarks/bench_loader.py [--root outputs/demo/datasets/task1_moving_grasp] [--chunks 10 50]
    .venv/bin/python benchmarks/bench_loader.py --video     # the same frames stored as video

Both loaders read the same dataset through a DataLoader with the same batch
size and the same shuffled order; rounds alternate between them and the median
samples/s of each is reported with the ratio ours/stock. `--video` first writes
a video-stored copy of the first `--video-episodes` episodes with LeRobot's own
dataset writer (under outputs/bench_loader/, reused while it exists).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def video_copy(src: Path, episodes: int) -> Path:
    from kuavo_train.data.storage import copy_as_video

    dst = Path("outputs/bench_loader") / f"{src.name}-video{episodes}"
    if (dst / "meta" / "info.json").is_file():
        return dst
    return copy_as_video(src, dst, episodes=list(range(episodes)), repo_id=f"bench/{dst.name}")


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
    args = ap.parse_args()
    if args.video:
        args.root = str(video_copy(Path(args.root), args.video_episodes))

    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from torch.utils.data import DataLoader

    from kuavo_train.data.frames import ChunkedFrameDataset

    root = Path(args.root)
    info = json.loads((root / "meta" / "info.json").read_text())
    repo_id = f"bench/{root.name}"
    fps = info["fps"]
    cams = [k for k, f in info["features"].items() if f["dtype"] in ("image", "video")]
    episodes = list(range(info["total_episodes"]))
    print(f"dataset {root} ({info['total_frames']} frames, cameras {len(cams)}, storage "
          f"{sorted({info['features'][c]['dtype'] for c in cams})}), batch {args.batch_size}, workers {args.workers}")
    for chunk in args.chunks:
        stock = LeRobotDataset(repo_id, root=root, delta_timestamps={"action": [i / fps for i in range(chunk)]})
        ours = ChunkedFrameDataset(repo_id, root, episodes=episodes, chunk_size=chunk, camera_keys=cams)
        n = args.batch_size * args.batches

        def rate(ds, seed):
            order = np.random.default_rng(seed).permutation(len(ds))[:n].tolist()
            loader = DataLoader(ds, batch_size=args.batch_size, sampler=order, num_workers=args.workers)
            t = time.perf_counter()
            for _ in loader:
                pass
            return n / (time.perf_counter() - t)

        rate(stock, 99), rate(ours, 99)  # warm-up (file opening, page cache)
        r = {"stock": [], "ours": []}
        for k in range(args.rounds):
            r["stock"].append(rate(stock, k))
            r["ours"].append(rate(ours, k))
        s, o = np.median(r["stock"]), np.median(r["ours"])
        print(f"chunk {chunk:>3}: stock {s:8.1f} samples/s, ours {o:8.1f} samples/s, ratio ours/stock {o / s:.1f}x")


if __name__ == "__main__":
    main()
