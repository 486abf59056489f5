"""Does a base's frozen vision tell where the things of each task are? A probe of its features.

    .venv/bin/python benchmarks/vision_probe.py outputs/demo/base/pretrained_model

A research tool (not part of `make demo`). The stages keep the vision tower and the language
model frozen, so the action expert can find an object only if the frozen features say where it
is. Here a small attention readout (the one the vision pretraining uses) learns, on the base's
frozen head-camera features of pretraining-type frames (`scene_frames`, a seed the base never
saw), where each thing is; it is then scored on the first frame of every task's held-out scenes
(the demo datasets' scene seeds; no dataset needed). Printed per feature level (the image tokens,
and each language-model layer's keys and values, which is what the expert attends to) and task:
the mean error (table units, per coordinate) of the task's object and of its marks, beside the
error of the best constant guess. Layer 0's keys and values are exact for the policy; deeper
layers here see the image tokens alone, without the instruction.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

MARKS = {"task1_moving_grasp": ("A", "B"), "task2_weighing": ("scale", "container"),
         "task3_placement": ("yellow",), "task4_sorting": ("slot",)}
HEAD_HALF_WIDTH = 0.5  # table units per image half-width of the head camera
HEAD_CAMERA = "observation.images.head_cam_h"


def features(policy, images: np.ndarray) -> dict[str, torch.Tensor]:
    """{level: (images, tokens, dim)} for uint8 (N, H, W, 3) head-camera images."""
    vwe = policy.model.vlm_with_expert
    lm = vwe.get_vlm_model().text_model
    kv, hooks = {}, []
    for i, layer in enumerate(lm.layers):
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: kv.__setitem__(("k", i), o)))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(lambda m, a, o, i=i: kv.__setitem__(("v", i), o)))
    out: dict[str, list] = {"image tokens": [], **{f"layer {i} K,V": [] for i in range(len(lm.layers))}}
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        for s in range(0, len(x), 256):
            # SmolVLA's own image preparation (its resize and pixel range) for one camera
            [img], _ = policy.prepare_images({HEAD_CAMERA: x[s : s + 256]})
            t = vwe.embed_image(img)
            out["image tokens"].append(t)
            # image tokens attend to each other fully in SmolVLA's prefix, as here
            lm(inputs_embeds=t * t.shape[-1] ** 0.5, attention_mask=torch.zeros(len(t), 1, t.shape[1], t.shape[1]))
            for i in range(len(lm.layers)):
                out[f"layer {i} K,V"].append(torch.cat([kv["k", i], kv["v", i]], -1))
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def main() -> None:
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from kuavo_train.data.demo_world.pretraining import ENTITIES, scene_frames, where_targets
    from kuavo_train.data.demo_world.world import KuavoDemoWorld
    from kuavo_train.data.demo_world.writer import scene_seeds
    from kuavo_train.training.pretrain import AttentionReadout, locate_loss

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="a pretrained_model folder (a base or any checkpoint of it)")
    p.add_argument("--scenes", type=int, default=1000, help="probe-training scenes per scene family")
    p.add_argument("--test-scenes", type=int, default=100, help="held-out scenes per task")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1, help="seed of the probe's training scenes (the demo base uses 0)")
    args = p.parse_args()
    torch.manual_seed(0)
    policy = SmolVLAPolicy.from_pretrained(args.base).eval()
    size = policy.config.input_features[HEAD_CAMERA].shape[-1]

    train = scene_frames(args.seed, args.scenes, size)
    train_feats, train_t = features(policy, train["images"][:, 0]), torch.from_numpy(train["targets"][:, 0])
    tests = {}
    for task in MARKS:
        imgs, tgts = [], []
        for s in scene_seeds(task, 0, args.test_scenes, "val"):
            w = KuavoDemoWorld(task, size)
            obs = w.reset(s)
            imgs.append(obs["observation.images.head_cam_h"])
            tgts.append(where_targets(w)[0])
        tests[task] = (features(policy, np.stack(imgs)), torch.from_numpy(np.stack(tgts)))

    print(f"{args.base}: error of the object / of the marks on held-out first frames (table units; constant guess)")
    gen = torch.Generator().manual_seed(0)
    for level, f in train_feats.items():
        head = AttentionReadout(f.shape[-1], train_t.shape[1])
        opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
        for _ in range(args.steps):
            idx = torch.randint(0, len(f), (128,), generator=gen)
            loss = locate_loss(head(f[idx]), train_t[idx])[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        cells = []
        with torch.no_grad():
            for task, (tf, tt) in tests.items():
                pred = head(tf[level])
                row = []
                for names in (("object",), MARKS[task]):
                    e = [ENTITIES.index(n) for n in names]
                    err = float((pred[:, e, :2] - tt[:, e, :2]).abs().mean()) * HEAD_HALF_WIDTH
                    const = float((tt[:, e, :2] - tt[:, e, :2].mean(0)).abs().mean()) * HEAD_HALF_WIDTH
                    row.append(f"{err:.3f} ({const:.3f})")
                cells.append(f"{task[:5]} {' / '.join(row)}")
        print(f"  {level:13s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
