"""Training step at full SmolVLA size: stock LeRobot vs our two cache levels, + bf16.

    .venv/bin/python benchmarks/bench_full_size_step.py [--batch-sizes 1 2] [--steps 3] [--threads 2]
                                                        [--device cpu|cuda] [--shape full|tiny]

The model is the real `SmolVLAPolicy` on a locally generated config shaped like
SmolVLM2-500M (450,046,176 parameters, random weights, no download), with
SmolVLA's defaults (`freeze_vision_encoder`, `train_expert_only`), three
480x640 cameras resized to 512, a 16-dim state and 50-step action chunks.

A step is: LeRobot preprocessor -> `policy.forward` -> backward -> grad clip ->
AdamW step, on a new frame each step, exactly as in training. Variants:
- stock: that step, nothing else;
- vision: the same step with the frozen-feature cache at the vision-output
  level (image features served), measured on a second pass over the frames
  (what every epoch after the first and every replayed frame costs); the
  first pass, which also fills the cache, is reported too;
- prefix: the same with the prefix cache (every VLM layer's keys and values
  of the image and language tokens served; the state token and the action
  expert run live), as training runs it by default with `train_expert_only`;
- vision and prefix step with our stages' fused AdamW (`optimizer.fused`), stock with
  torch's default AdamW, as lerobot-train;
- *-bf16: the same under torch.autocast(bfloat16), as
  `policy.mixed_precision=bf16` runs it.
Each variant runs in its own process (so its peak RSS is its own), one after
the other in the same invocation; only the ratios printed at the end mean
something on a shared machine. On `--device cuda` the peak is the GPU's
allocated memory and each step is synchronized before it is timed.
`--shape tiny` (the embedded tiny backbone, 64 px) only checks that the script
runs (`benchmarks/gpu.sh --quick`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CAMERAS = ("observation.images.head_cam_h", "observation.images.wrist_cam_l", "observation.images.wrist_cam_r")
STATE_DIM = ACTION_DIM = 16
CHUNK = 50


def shape(name: str):
    """(backbone spec, resize px, camera (height, width)) of a benchmark size."""
    from kuavo_train.policy.tiny_vlm import SMOLVLM2_500M_SHAPE, TinyVLMSpec

    return {"full": (SMOLVLM2_500M_SHAPE, 512, (480, 640)), "tiny": (TinyVLMSpec(), 64, (48, 64))}[name]


def build_vlm(out_dir: Path, size: str) -> str:
    from kuavo_train.policy import vlm_cache
    from kuavo_train.policy.tiny_vlm import write_tiny_vlm

    write_tiny_vlm(out_dir, ["pick up the object and place it on the target"], shape(size)[0])
    return vlm_cache.register(out_dir)


def child(args) -> dict:
    import numpy as np
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from kuavo_train.config.schema import FeatureCacheSettings
    from kuavo_train.policy.feature_cache import serving
    from kuavo_train.policy.prefix_cache import create_cache
    from kuavo_train.training.optim import build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, px, (h, w) = shape(args.shape)
    cuda = args.device.startswith("cuda")
    cfg = SmolVLAConfig(
        input_features={
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
            **{k: PolicyFeature(type=FeatureType.VISUAL, shape=(3, h, w)) for k in CAMERAS},
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        vlm_model_name=args.vlm, load_vlm_weights=False, device=args.device, push_to_hub=False, chunk_size=CHUNK,
        resize_imgs_with_padding=(px, px),
    )
    t0 = time.perf_counter()
    policy = SmolVLAPolicy(cfg).to(args.device)
    build_s = time.perf_counter() - t0
    total = sum(p.numel() for p in policy.parameters())
    params = [p for p in policy.parameters() if p.requires_grad]
    stats = {k: {"mean": np.zeros(d, np.float32), "std": np.ones(d, np.float32),
                 "min": -np.ones(d, np.float32), "max": np.ones(d, np.float32)}
             for k, d in (("observation.state", STATE_DIM), ("action", ACTION_DIM))}
    pre, _ = make_pre_post_processors(cfg, dataset_stats=stats)
    # the same preset hyper-parameters; only ours fused (see the variants above)
    optimizer = build_optimizer(cfg, params, fused=not args.variant.startswith("stock"))
    b = args.batch_size
    frames = b * args.steps
    rng = np.random.default_rng(0)
    images = {k: torch.from_numpy(rng.integers(0, 256, (frames, 3, h, w), dtype=np.uint8)) for k in CAMERAS}

    def raw_batch(step):
        rows = list(range(step * b, (step + 1) * b))
        out = {k: v[rows].float().div(255) for k, v in images.items()}
        out["observation.state"] = torch.randn(b, STATE_DIM)
        out["action"] = torch.randn(b, CHUNK, ACTION_DIM)
        out["action_is_pad"] = torch.zeros(b, CHUNK, dtype=torch.bool)
        out["task"] = ["pick up the object and place it on the target"] * b
        out["task_id"] = torch.ones(b, dtype=torch.long)
        out["index"] = torch.tensor(rows)
        return out

    cache = None
    if args.variant.split("-")[0] in ("vision", "prefix"):
        # The cache training makes, at the variant's level.
        cache = create_cache(policy, FeatureCacheSettings(dir=args.cache_dir, max_gb=64, prefix_max_gb=64,
                                                          prefix=args.variant.startswith("prefix")))
        cache.register(1, f"bench-b{b}-{args.variant}", frames)
        cache.attach()
    bf16 = args.variant.endswith("bf16")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(i):
        raw = raw_batch(i)
        sync()
        t = time.perf_counter()
        batch = pre(dict(raw))
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16), serving(cache, raw, batch):
            loss, _ = policy.forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    policy.train()
    step(0)  # warm-up of kernels and allocator (its frame is visited again below)
    first_pass = [step(i) for i in range(args.steps)]
    second_pass = [step(i) for i in range(args.steps)]
    return {
        "variant": args.variant, "batch": b, "parameters": total, "trainable": sum(p.numel() for p in params),
        "build_s": build_s, "first_pass_s": first_pass, "step_s": second_pass,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "cache": cache.summary() if cache else None,
        "entry_bytes": _entry_bytes(args.cache_dir, f"bench-b{b}-{args.variant}") if cache else None,
    }


def _entry_bytes(cache_dir: str, fingerprint: str) -> dict:
    """Bytes per frame of each store (camera or prefix) of this variant's dataset."""
    import numpy as np

    out = {}
    for f in Path(cache_dir).rglob(f"{fingerprint}/*.features.npy"):
        arr = np.load(f, mmap_mode="r")
        level = "prefix" if f.name.startswith("prefix-") else "vision"
        out[level] = out.get(level, 0) + int(np.prod(arr.shape[1:])) * arr.itemsize
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per pass")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["stock", "vision", "prefix", "stock-bf16", "vision-bf16", "prefix-bf16"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    ap.add_argument("--shape", choices=["full", "tiny"], default="full")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--vlm", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    import statistics

    with tempfile.TemporaryDirectory(prefix="kuavo-bench-") as tmp:
        os.environ.setdefault("HF_HOME", str(Path(tmp) / "hf"))
        vlm = build_vlm(Path(tmp) / "vlm", args.shape)
        results = {}
        for b in args.batch_sizes:
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--child", "--variant", variant, "--batch-size", str(b),
                       "--steps", str(args.steps), "--threads", str(args.threads), "--vlm", vlm,
                       "--device", args.device, "--shape", args.shape,
                       "--cache-dir", str(Path(tmp) / "cache")]
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{variant} batch {b} failed:\n{out.stderr[-3000:]}")
                r = json.loads(line[7:])
                results[(variant, b)] = r
                step_s = statistics.median(r["step_s"])
                gpu = f", peak GPU memory {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] is not None else ""
                print(f"batch {b} {variant:>10}: step {step_s:6.3f} s ({1 / step_s:6.2f} steps/s; "
                      f"first pass {statistics.median(r['first_pass_s']):6.3f} s), peak RSS {r['peak_rss_gib']:.2f} GiB{gpu}, "
                      f"{r['parameters']:,} parameters ({r['trainable']:,} trainable)"
                      + (f"; cache: {r['cache']}; bytes per frame: "
                         + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(r["entry_bytes"].items()))
                         if r["cache"] else ""), flush=True)
        print(f"\nratios (stock fp32 step time / variant step time; {args.device}, {args.threads} threads, "
              f"median of {args.steps} steps):")
        for b in args.batch_sizes:
            base = statistics.median(results[("stock", b)]["step_s"])
            for variant in args.variants:
                if (variant, b) in results and variant != "stock":
                    r = results[(variant, b)]
                    print(f"  batch {b}: {variant:>10} {base / statistics.median(r['step_s']):5.2f}x"
                          + (f"   (first pass {base / statistics.median(r['first_pass_s']):4.2f}x)"
                             if not variant.startswith("stock") else ""))


if __name__ == "__main__":
    main()
