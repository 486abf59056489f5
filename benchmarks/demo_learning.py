"""How fast the tiny SmolVLA learns one demo-world task, judged closed loop.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_learning.py --task task4_sorting --steps 1200 --train vision+vlm
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_learning.py --task task4_sorting --steps 1200 --train expert
    .venv/bin/python benchmarks/demo_learning.py --train expert --base outputs/pretrained_demo/base/pretrained_model

A research tool for the demo's closed-loop success (not part of `make demo`): one task's
training episodes of the demo datasets (`make demo` or `kuavo-train make-data` writes them),
a fresh embedded base (`kuavo-train build-base`'s model, the demo's chunk 10 / 5 action
steps) or the one given by `--base` (e.g. a pretrained one), plain AdamW with warmup and cosine decay on uniformly drawn samples, and every
`--eval-every` steps the closed-loop success and mean progress (the env's reward: key
events done, in [0, 1]) on `--episodes` held-out scenes, all stepped together through the
same evaluation as the forgetting matrices. `--train` chooses what learns: `expert` (the
stages' setting: vision and language model frozen), `vision` (+ vision tower and
connector) or `vision+vlm` (everything). Prints one line per evaluation with the step,
mean training loss, steps/s and the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

CAMERAS = ("observation.images.head_cam_h", "observation.images.wrist_cam_l", "observation.images.wrist_cam_r")


def load_split(root: Path, task: str, chunk: int, split: str) -> dict:
    """Every sample of a split in memory (the demo datasets are small): images kept as uint8."""
    from kuavo_train.data.demo_world.tasks import TASKS_BY_NAME
    from kuavo_train.data.frames import ChunkedFrameDataset

    a, b = map(int, json.loads((root / "meta" / "info.json").read_text())["splits"][split].split(":"))
    ds = ChunkedFrameDataset(f"kuavo_demo/{task}", root, episodes=list(range(a, b)), chunk_size=chunk,
                             camera_keys=list(CAMERAS), task=TASKS_BY_NAME[task].instruction)
    items = [ds[i] for i in range(len(ds))]
    out = {k: torch.stack([it[k] for it in items]) for k in ("observation.state", "action", "action_is_pad")}
    for k in CAMERAS:
        out[k] = torch.stack([(it[k] * 255).round().to(torch.uint8) for it in items])
    out["task"] = [it["task"] for it in items]
    return out


def batch_at(data: dict, idx: torch.Tensor) -> dict:
    b = {k: v[idx] for k, v in data.items() if k != "task"}
    for k in CAMERAS:
        b[k] = b[k].float() / 255
    b["task"] = [data["task"][i] for i in idx.tolist()]
    return b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="task4_sorting")
    ap.add_argument("--data", default="outputs/demo/datasets", help="folder of the demo datasets")
    ap.add_argument("--train", choices=("expert", "vision", "vision+vlm"), default="vision+vlm")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--episodes", type=int, default=20, help="held-out scenes per evaluation (all at once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="save the trained policy and its processors here")
    ap.add_argument("--base", default=None, help="start from this pretrained_model folder instead of a fresh base")
    args = ap.parse_args()

    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from kuavo_train.config.loading import load_run_config
    from kuavo_train.data.stats import training_stats
    from kuavo_train.data.task_data import open_task_data
    from kuavo_train.evaluation.closed_loop import StockPolicyFn, run_closed_loop
    from kuavo_train.policy import factory, vlm_cache
    from kuavo_train.policy.base_model import build_base_model

    root = Path(args.data) / args.task
    demo = load_run_config(["profile=demo", f"data_root={args.data}"])
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.base) if args.base else build_base_model(Path(tmp) / "base", instructions=[s.instruction for s in demo.ordered_stages()],
                                image_size=demo.demo.image_size, chunk_size=demo.policy.chunk_size,
                                n_action_steps=demo.policy.n_action_steps, seed=args.seed)
        cfg = dataclasses.replace(factory.read_pretrained_config(base), freeze_vision_encoder=args.train == "expert",
                                  train_expert_only=args.train != "vision+vlm", optimizer_lr=args.lr)
        vlm_cache.ensure_available(cfg.vlm_model_name, base)
        policy = SmolVLAPolicy.from_pretrained(str(base), config=cfg)
    if args.train == "vision":  # SmolVLA has no switch for "vision tower and connector, language model frozen"
        for name, p in policy.named_parameters():
            p.requires_grad |= "vision_model" in name or "connector" in name
    data = load_split(root, args.task, cfg.chunk_size, "train")
    # the pipeline's own statistics of this task's training episodes
    stats = training_stats([open_task_data(next(s for s in demo.ordered_stages() if s.name == args.task))])
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    params = [p for p in policy.parameters() if p.requires_grad]
    print(f"{args.task}: {len(data['task'])} training samples; training {args.train}: "
          f"{sum(p.numel() for p in params):,} of {sum(p.numel() for p in policy.parameters()):,} parameters", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup)
                                              * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    losses, t0, train_time = [], time.perf_counter(), 0.0
    policy.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(data["task"]), (args.batch_size,), generator=gen)
        loss, _ = policy(pre(batch_at(data, idx)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            train_time += time.perf_counter() - t0
            policy.eval()
            res = run_closed_loop(args.task, root, StockPolicyFn(policy, pre, post), args.episodes,
                                  batch_size=args.episodes)
            progress = float(np.mean([e["max_reward"] for e in res["episodes"]]))
            print(f"step {step}: loss {np.mean(losses[-args.eval_every:]):.4f}, {step / train_time:.2f} steps/s; "
                  f"closed loop on {args.episodes} held-out scenes: success {res['success_rate']:.0%}, "
                  f"mean progress {progress:.2f}", flush=True)
            policy.train()
            t0 = time.perf_counter()
    if args.save:
        policy.save_pretrained(args.save)
        pre.save_pretrained(args.save)
        post.save_pretrained(args.save)


if __name__ == "__main__":
    main()
