"""Pretraining the embedded base the way `lerobot/smolvla_base` was made, on the demo world's
pretraining set (`kuavo_train/data/demo_world/pretraining.py`), never on the tasks' data.

1. The vision tower: a real SmolVLA starts from SmolVLM, whose vision tower was pretrained on
   other images before any robot data; the stages then keep it frozen. The embedded base's
   tower is random, and a frozen random tower leaves the action expert unable to find the
   object (README measurements). `pretrain_vision` trains the tower and the connector (the
   image tokens the rest of the model reads): a readout of a camera's image tokens must give the
   image position of every object, mark and hand in view. The readout is thrown away. It reads
   the tokens the way the action expert will, by attention (one query per thing), so the tower
   learns to put each thing's position where attention can pick it up (a linear readout of all
   tokens at once: 30% against 35% on task 4 alone, one seed, within the noise of 20 scenes;
   README, "Measured results").
2. The robot skills: `pretrain_skills` then trains the language model, the connector and the
   action expert (vision tower frozen) with SmolVLA's own loss on the skills' episodes and
   their generic instructions, as smolvla_base was pretrained on community datasets.
Neither loop exists in LeRobot for in-memory generated frames (lerobot-train wants a dataset on
disk and one run per call), hence these two short loops.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import numpy as np
import torch

from kuavo_train.config.schema import DemoSettings

log = logging.getLogger(__name__)


def vision_parameters(policy) -> list[torch.nn.Parameter]:
    vlm = policy.model.vlm_with_expert.get_vlm_model()
    return [*vlm.vision_model.parameters(), *vlm.connector.parameters()]


def locate_loss(pred: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared position error where the entity is in view, plus a small in-view classification
    term; and the mean absolute position error (image half-widths) for the log."""
    seen = targets[..., 2]
    n = seen.sum().clamp_min(1)
    pos_err = (pred[..., :2] - targets[..., :2]) * seen.unsqueeze(-1)
    loss = (pos_err**2).sum() / n + 0.1 * torch.nn.functional.binary_cross_entropy_with_logits(pred[..., 2], seen)
    return loss, pos_err.abs().sum() / n / 2


def pretrain_vision(policy, images: np.ndarray, targets: np.ndarray, *, steps: int, lr: float, batch_size: int = 64,
                    warmup: int = 100, seed: int = 0, held_out: float = 0.1, progress: bool = False) -> dict:
    """Train the vision tower + connector of `policy` in place on (frames, cameras, H, W, 3) uint8
    images and their `where_targets`; every camera image is one sample. Returns a summary with the
    readout's mean position error (image half-widths) on a seeded 10% of the images never trained on."""
    vwe = policy.model.vlm_with_expert
    x = torch.from_numpy(images.reshape(-1, *images.shape[2:])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(targets.reshape(-1, *targets.shape[2:]))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    n_val = max(1, int(held_out * len(x)))
    val, train = order[:n_val], order[n_val:]
    size = policy.config.resize_imgs_with_padding

    def feats(idx):
        img = x[idx].float() / 255
        if size is not None and tuple(img.shape[-2:]) != tuple(size):
            img = torch.nn.functional.interpolate(img, size=tuple(size), mode="bilinear", align_corners=False)
        return vwe.embed_image(img * 2.0 - 1.0)  # SmolVLA's own pixel range

    with torch.no_grad():
        dim = feats(val[:2]).shape[-1]
    head = AttentionReadout(dim, y.shape[1])
    params = vision_parameters(policy)

    def evaluate() -> float:
        errs = []
        with torch.no_grad():
            for i in range(0, n_val, 256):
                idx = val[i : i + 256]
                errs.append(float(locate_loss(head(feats(idx)), y[idx])[1]) * len(idx))
        return sum(errs) / n_val

    def step_loss():
        idx = train[torch.randint(0, len(train), (batch_size,), generator=gen)]
        return locate_loss(head(feats(idx)), y[idx])[0]

    with _training_only(policy, params):
        _, seconds = _optimize("vision pretraining", [*params, *head.parameters()], step_loss, steps=steps, lr=lr,
                               warmup=warmup, progress=progress)
    after = evaluate()
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "images": int(len(x)), "held_out_images": n_val,
            "held_out_position_error": round(after, 4),
            "seconds": round(seconds, 1)}


class AttentionReadout(torch.nn.Module):
    """One learned query per entity, multi-head attention over a camera's image tokens, then
    (u, v, in-view logit) per entity."""

    def __init__(self, dim: int, entities: int, width: int = 64, heads: int = 4):
        super().__init__()
        self.heads, self.width = heads, width
        self.query = torch.nn.Parameter(torch.randn(entities, width) * width**-0.5)
        self.key, self.value = torch.nn.Linear(dim, width), torch.nn.Linear(dim, width)
        self.out = torch.nn.Linear(width, 3)

    def forward(self, tokens):
        b, n, _ = tokens.shape
        h, d = self.heads, self.width // self.heads
        k = self.key(tokens).view(b, n, h, d).transpose(1, 2)
        v = self.value(tokens).view(b, n, h, d).transpose(1, 2)
        q = self.query.view(-1, h, d).transpose(0, 1).expand(b, h, -1, d)
        pooled = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, self.width)
        return self.out(pooled)


@contextlib.contextmanager
def _training_only(policy, params):
    """`policy` in train mode with gradients for `params` only; its own flags and eval mode after."""
    before = {id(p): p.requires_grad for p in policy.parameters()}
    chosen = {id(p) for p in params}
    for p in policy.parameters():
        p.requires_grad_(id(p) in chosen)
    policy.train()
    try:
        yield
    finally:
        policy.eval()
        for p in policy.parameters():
            p.requires_grad_(before[id(p)])


def _optimize(name: str, params, step_loss, *, steps: int, lr: float, warmup: int, clip: float | None = None,
              progress: bool = False):
    """AdamW with linear warmup and cosine decay over `steps` calls of `step_loss()`; the losses and seconds.
    `progress`: a progress bar (for a terminal; the log lines are written either way)."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    t0, losses = time.perf_counter(), []
    bar = tqdm(total=steps, desc=name, unit="step", disable=not progress, leave=False, dynamic_ncols=True)
    for step in range(1, steps + 1):
        loss = step_loss()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.update()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
        if step % max(1, steps // 5) == 0 or step == steps:
            log.info("%s step %d/%d: loss %.4f, %.1f steps/s", name, step, steps, float(np.mean(losses[-100:])),
                     step / (time.perf_counter() - t0))
    bar.close()
    return losses, time.perf_counter() - t0


def skill_stats(frames: dict) -> dict:
    """The normalization statistics the skills phase trains with: the pretraining frames' own (the
    base keeps no processors; a stage normalizes with its tasks' data, as a fine-tune of
    smolvla_base does)."""
    return {k: {"mean": v.mean(0), "std": v.std(0).clamp_min(1e-3), "min": v.min(0).values, "max": v.max(0).values}
            for k, v in (("observation.state", torch.from_numpy(frames["state"])),
                         ("action", torch.from_numpy(frames["action"])))}


def skill_observations(frames: dict, idx, instructions: list[str]) -> dict:
    """The policy's raw inputs for frames `idx` of `pretraining_frames` output, as a LeRobot dataset
    gives them: the state, each camera's image (float, channels first, in [0, 1]) and the frame's
    skill instruction (`instructions` indexed by skill)."""
    from kuavo_train.data.demo_world.tasks import CAMERAS

    idx = torch.as_tensor(idx)
    batch = {"observation.state": torch.from_numpy(frames["state"])[idx],
             "task": [instructions[int(frames["skill"][i])] for i in idx]}
    images = torch.from_numpy(frames["images"]).permute(0, 1, 4, 2, 3)  # frames, cameras, C, H, W
    for c, camera in enumerate(CAMERAS):
        batch[f"observation.images.{camera}"] = images[idx, c].float() / 255
    return batch


def pretrain_skills(policy, frames: dict, instructions: list[str], *, steps: int, batch_size: int,
                    lr: float = 1e-3, warmup: int = 50, seed: int = 0, progress: bool = False) -> dict:
    """Train everything but the vision tower of `policy` in place with SmolVLA's flow-matching loss
    on `pretraining_frames` (chunks cut within each episode, padded and masked past its end as
    LeRobot does), normalized with the frames' own mean/std. Returns a summary."""
    from lerobot.policies.factory import make_pre_post_processors

    cfg = policy.config
    action = torch.from_numpy(frames["action"])
    episode = torch.from_numpy(frames["episode"])
    n = len(action)
    # chunk indices: frame t's next chunk_size actions of its own episode (the last one repeated)
    end = torch.zeros(n, dtype=torch.long)
    for e in torch.unique(episode):
        idx = torch.nonzero(episode == e).flatten()
        end[idx] = idx[-1]
    steps_ahead = torch.arange(n).unsqueeze(1) + torch.arange(cfg.chunk_size)
    pad = steps_ahead > end.unsqueeze(1)
    chunks = torch.minimum(steps_ahead, end.unsqueeze(1))
    pre, _ = make_pre_post_processors(cfg, dataset_stats=skill_stats(frames))
    params = [p for name, p in policy.named_parameters() if "vision_model" not in name]
    gen = torch.Generator().manual_seed(seed)

    def step_loss():
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        batch = {**skill_observations(frames, idx, instructions), "action": action[chunks[idx]],
                 "action_is_pad": pad[idx]}
        return policy(pre(batch))[0]

    with _training_only(policy, params):
        losses, seconds = _optimize("skill pretraining", params, step_loss, steps=steps, lr=lr, warmup=warmup, clip=1.0,
                                    progress=progress)
    window = max(1, min(100, steps // 5))
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "first_loss": round(float(np.mean(losses[:window])), 4),
            "final_loss": round(float(np.mean(losses[-window:])), 4), "seconds": round(seconds, 1)}


def demo_world_pretraining(d: DemoSettings, *, progress: bool = False):
    """`build_base_model`'s `pretrain` callback for the `demo:` settings (`DemoSettings`, where every
    default lives): the pretraining set's frames, then `pretrain_vision` (on the skills' frames and
    `pretrain_vision_scenes` random-pose frames per scene family) and `pretrain_skills` (either
    skipped at 0 steps); `progress`: a progress bar per phase."""
    from kuavo_train.data.demo_world.pretraining import SKILLS, pretraining_frames, scene_frames

    def run(policy) -> dict:
        t0 = time.perf_counter()
        frames = pretraining_frames(d.seed, d.pretrain_episodes_per_skill, d.image_size)
        made = time.perf_counter() - t0
        log.info("pretraining set: %d frames of %d skills x %d scenes generated in %.0f s",
                 len(frames["images"]), len(SKILLS), d.pretrain_episodes_per_skill, made)
        out = {"skills": [s.instruction for s in SKILLS], "seed": d.seed,
               "episodes_per_skill": d.pretrain_episodes_per_skill,
               "frames": int(len(frames["images"])), "generation_seconds": round(made, 1)}
        if d.pretrain_vision_steps > 0:
            images, targets = frames["images"], frames["targets"]
            if d.pretrain_vision_scenes > 0:
                t0 = time.perf_counter()
                scenes = scene_frames(d.seed, d.pretrain_vision_scenes, d.image_size)
                images, targets = np.concatenate([images, scenes["images"]]), np.concatenate([targets, scenes["targets"]])
                out["vision_scene_frames"] = int(len(scenes["images"]))
                log.info("vision pretraining set: %d more frames of random poses in %d scenes per family, %.0f s",
                         len(scenes["images"]), d.pretrain_vision_scenes, time.perf_counter() - t0)
            out["vision"] = pretrain_vision(policy, images, targets, steps=d.pretrain_vision_steps,
                                            lr=d.pretrain_vision_lr, seed=d.seed, progress=progress)
            log.info("vision pretraining done in %.0f s: held-out position error %.3f image half-widths",
                     out["vision"]["seconds"], out["vision"]["held_out_position_error"])
        if d.pretrain_skill_steps > 0:
            out["skills_training"] = pretrain_skills(policy, frames, out["skills"], steps=d.pretrain_skill_steps,
                                                       batch_size=d.pretrain_skill_batch_size, seed=d.seed,
                                                       progress=progress)
            log.info("skill pretraining done in %.0f s: loss %.4f", out["skills_training"]["seconds"],
                     out["skills_training"]["final_loss"])
        return out

    return run
