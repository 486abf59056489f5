"""select_action latency: our wrapper vs stock LeRobot on the same checkpoint and inputs.

    .venv/bin/python benchmarks/bench_inference.py --checkpoint outputs/demo/run [--iters 200]

Both paths are timed interleaved in the same process (the machine is shared and
noisy, so only the ratio means something). "first" = a call that computes a new
chunk, "queued" = a call served from the action queue.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="outputs/demo/run")
    ap.add_argument("--iters", type=int, default=100, help="chunks per path")
    args = ap.parse_args()

    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper, resolve_pretrained_dir

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = resolve_pretrained_dir(args.checkpoint)
    ours = SmolVLAPolicyWrapper.from_pretrained(path)
    stock = SmolVLAPolicy.from_pretrained(str(path))
    stock.eval()
    pre, post = make_pre_post_processors(stock.config, pretrained_path=str(path))
    n = ours.n_action_steps
    rng = np.random.default_rng(0)
    size = ours.config.input_features[ours.camera_keys[0]].shape[-1]
    obs = {k: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for k in ours.camera_keys}
    obs["observation.state"] = rng.normal(size=ours.state_dim).astype(np.float32)
    instr = ours.instructions[0] if ours.instructions else "do the task"

    def stock_step():
        batch = {k: torch.from_numpy(v).permute(2, 0, 1).float().div(255).unsqueeze(0) if k != "observation.state"
                 else torch.from_numpy(v).unsqueeze(0) for k, v in obs.items()}
        batch["task"] = [instr]
        with torch.no_grad():
            return post(stock.select_action(pre(batch)))

    def ours_step():
        return ours.select_action({**obs, "task": instr})

    times = {"ours": {"first": [], "queued": []}, "stock": {"first": [], "queued": []}}
    for fn, name, reset in ((ours_step, "ours", ours.reset), (stock_step, "stock", stock.reset)):
        reset()
        for _ in range(n):  # warm-up
            fn()
    for _ in range(args.iters):
        for fn, name, reset in ((ours_step, "ours", ours.reset), (stock_step, "stock", stock.reset)):
            reset()
            for i in range(n):
                t = time.perf_counter()
                fn()
                times[name]["first" if i == 0 else "queued"].append(time.perf_counter() - t)
    print(f"checkpoint {path}, n_action_steps {n}, {args.iters} chunks per path, {torch.get_num_threads()} threads")
    print(f"{'call':<8}{'path':<7}{'p50 ms':>10}{'p95 ms':>10}")
    for kind in ("first", "queued"):
        p = {}
        for name in ("ours", "stock"):
            v = np.array(times[name][kind]) * 1000
            p[name] = (np.percentile(v, 50), np.percentile(v, 95))
            print(f"{kind:<8}{name:<7}{p[name][0]:>10.3f}{p[name][1]:>10.3f}")
        print(f"{kind:<8}ratio ours/stock p50 {p['ours'][0] / p['stock'][0]:.2f}, p95 {p['ours'][1] / p['stock'][1]:.2f}")


if __name__ == "__main__":
    main()
