"""Re-store a LeRobot dataset's camera images as video, with LeRobot's own writer.

Users record either way; the demo world writes images (no FFmpeg needed to
read them). This copy lets the loader benchmark and tests cover video-stored
data with the same frames.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

def copy_as_video(src: str | Path, dst: str | Path, *, episodes: list[int], repo_id: str | None = None,
                  state_key: str = "observation.state", action_key: str = "action",
                  size: tuple[int, int] | None = None) -> Path:
    """Write episodes `episodes` of dataset `src` to `dst`: cameras as video (resized to `size` = (height,
    width) if given, e.g. to a real camera's resolution), plus state and action."""
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from kuavo_train.data.frames import ChunkedFrameDataset

    src, dst = Path(src), Path(dst)
    info = json.loads((src / "meta" / "info.json").read_text())
    cams = [k for k, v in info["features"].items() if v["dtype"] in ("image", "video")]
    feats = {k: dict(info["features"][k]) for k in [state_key, action_key, *cams]}
    for k in cams:
        feats[k]["dtype"] = "video"
        if size is not None:
            feats[k]["shape"] = [int(size[0]), int(size[1]), 3]
            feats[k]["names"] = ["height", "width", "channels"]
    shutil.rmtree(dst, ignore_errors=True)
    out = LeRobotDataset.create(repo_id or f"local/{dst.name}", fps=info["fps"], features=feats, root=dst,
                                use_videos=True, robot_type=info.get("robot_type"))
    for ep in episodes:
        frames = ChunkedFrameDataset("local/src", src, episodes=[ep], chunk_size=1, camera_keys=cams,
                                     state_key=state_key, action_key=action_key)
        for i in range(len(frames)):
            item = frames[i]
            images = {k: item[k] for k in cams}
            if size is not None:
                images = {k: torch.nn.functional.interpolate(v[None], size=tuple(size), mode="bilinear",
                                                             align_corners=False)[0].clamp(0, 1)
                          for k, v in images.items()}
            row = {k: v.permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy() for k, v in images.items()}
            row[state_key] = item[state_key].numpy()
            row[action_key] = item[action_key][0].numpy()
            row["task"] = item["task"]
            out.add_frame(row)
        out.save_episode()
    out.finalize()
    return dst
