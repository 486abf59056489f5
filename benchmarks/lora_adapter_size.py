"""Size of one `lora_per_task` adapter on the full-size SmolVLA architecture (SmolVLM2-500M
backbone, as smolvla_base) and on the embedded tiny one, without any weights: the model is
built on PyTorch's meta device, so this takes seconds and no download.

    .venv/bin/python benchmarks/lora_adapter_size.py [--rank 16] [--targets expert_all_linear]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def adapter_parameters(size: str, rank: int, targets: str) -> tuple[int, int]:
    import torch
    from bench_full_size_step import CAMERAS, CHUNK, build_vlm, shape
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from kuavo_train.policy import adapters

    with tempfile.TemporaryDirectory() as tmp:
        vlm = build_vlm(Path(tmp) / "vlm", size)
        _, px, (h, w) = shape(size)
        cfg = SmolVLAConfig(
            input_features={"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(16,)),
                            **{k: PolicyFeature(type=FeatureType.VISUAL, shape=(3, h, w)) for k in CAMERAS}},
            output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(16,))},
            vlm_model_name=vlm, load_vlm_weights=False, device="cpu", push_to_hub=False, chunk_size=CHUNK,
            resize_imgs_with_padding=(px, px))
        with torch.device("meta"):
            policy = SmolVLAPolicy(cfg)
        total = sum(p.numel() for p in policy.parameters())
        adapters.add_adapter(policy, "task1", adapters.lora_config(policy, rank=rank, alpha=2.0 * rank,
                                                                                targets=targets))
        lora = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    return lora, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="smolvla_default", help="strategy.targets of lora_per_task")
    args = ap.parse_args()
    for size in ("full", "tiny"):
        lora, total = adapter_parameters(size, args.rank, args.targets)
        print(f"{size}-size SmolVLA ({total / 1e6:.1f} M parameters): one rank-{args.rank} adapter on {args.targets} "
              f"= {lora:,} parameters "
              f"= {lora * 4 / 2**20:.2f} MiB in float32 ({100 * lora / total:.3f}% of the model)")


if __name__ == "__main__":
    main()
