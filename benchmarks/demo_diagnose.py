"""Why a demo-world policy fails: how far its episodes get, and whether it looks for the object.

    .venv/bin/python benchmarks/demo_diagnose.py outputs/demo/run/stage4_task4_sorting/checkpoints/last/pretrained_model
    .venv/bin/python benchmarks/demo_diagnose.py <checkpoint>/pretrained_model --tasks task3_placement --scenes 60
    .venv/bin/python benchmarks/demo_diagnose.py outputs/demo/base/pretrained_model --tasks task1_moving_grasp \
        --instruction "put the red block on the green square"
    .venv/bin/python benchmarks/demo_diagnose.py outputs/demo/base/pretrained_model --skills 2,3,6

A research tool (not part of `make demo`); it needs the demo datasets (`make demo` or
`kuavo-train make-data`). For each task it prints two things:

1. Closed loop on the held-out scenes: how many episodes reached each number of key events,
   for the episodes that never grasped, how far the grasping hand was from the object when
   its claw first closed, and, for each time the object was let go where placing it was the
   next event and the place did not count, how far it was from that place's mark and from the
   nearest other mark of the scene (a policy that carries to the wrong mark lands near one). The
   episodes here run one after another with their own noise draw, not batched as in the
   forgetting matrices, so the success count can differ from theirs by sampling noise.
2. The first chunk on `--scenes` fresh scenes (never in any dataset): the policy's chunk from
   the very first observation against the scripted expert's next actions from the same state.
   At that instant every scene starts from the same arm pose, so only the cameras can tell
   where the object is. Printed: the mean distance of the grasping hand's (x, y) targets to
   the expert's, beside the same for the best constant chunk (the mean of the expert's chunks
   over the scenes), and the correlation of the policy's chunk-end target with the expert's
   per coordinate that varies across scenes. A policy that reads the object's place from the
   images has a distance well below the constant's and a correlation near 1; one that replays
   an average motion has a distance near or above the constant's and a correlation near 0.

With `--skills` (on an embedded base from `kuavo-train build-base` with a skills phase), the same
comparison on the pretraining skills' frames instead: for each skill given (its index in
`kuavo_train/data/demo_world/pretraining.py`'s SKILLS) and each `--frames` offset, the chunk
planned from that frame of the skill's episodes against the chunk the expert recorded from it,
on the base's own pretraining scenes (what the skills phase trained on) and on as many fresh
scenes of the same skills. It tells a skills phase that did not fit its own data from one
that fit it and does not generalize.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# First scene seed of the first-chunk probe: above every scene seed the dataset writer draws
# (training scenes below 10,000,000 + count, held-out ones from 1,000,000 up to 11,000,000 + count).
FRESH_SCENES = 20_000_000


def policy_actors(checkpoint: str):
    """A checkpoint as the two callables the diagnosis needs: `act(envs, obs)` -> (n, 16) actions
    through `select_action` (its action queue, as closed-loop evaluation), and `chunk(envs, obs)`
    -> (n, chunk_size, 16) from `predict_action_chunk` (`chunk.plan(batch)` from a raw batch); both
    un-normalized."""
    from lerobot.envs import preprocess_observation
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from kuavo_train.data.demo_world.tasks import CAMERAS

    policy = SmolVLAPolicy.from_pretrained(checkpoint)
    policy.eval()
    if (Path(checkpoint) / "policy_preprocessor.json").is_file():
        pre, post = make_pre_post_processors(policy.config, pretrained_path=checkpoint)
    else:  # an embedded base: the statistics its skills phase trained with
        pre, post = make_pre_post_processors(policy.config, dataset_stats=base_skill_stats(checkpoint))

    def batch_of(envs, obs):  # as lerobot-eval's vector env stacks them
        batch = preprocess_observation({"pixels": {c: np.stack([o["pixels"][c] for o in obs]) for c in CAMERAS},
                                        "agent_pos": np.stack([o["agent_pos"] for o in obs])})
        batch["task"] = [e.task_description for e in envs]
        return batch

    def act(envs, obs):
        with torch.inference_mode():
            return post(policy.select_action(pre(batch_of(envs, obs)))).numpy()

    def plan(batch):
        with torch.inference_mode():
            return post(policy.predict_action_chunk(pre(batch))).numpy()

    def chunk(envs, obs):
        return plan(batch_of(envs, obs))

    act.reset = policy.reset
    chunk.plan = plan  # the same from a raw batch (the `--skills` probe)
    return act, chunk


def base_pretraining_info(checkpoint: str) -> dict:
    """The `pretraining` record of a `kuavo-train build-base` folder's base_info.json, with its
    `image_size` (a base from before the seed was recorded: the demo's seed 0)."""
    import json

    info_file = Path(checkpoint).parent / "base_info.json"
    base = json.loads(info_file.read_text()) if info_file.is_file() else {}
    info = base.get("pretraining") or {}
    if "skills_training" not in info:
        raise SystemExit(f"{checkpoint}: no skills phase recorded in {info_file}: no statistics for a base without "
                         "pre/post-processors, no pretraining set for --skills")
    return {"seed": 0, **info, "image_size": base["tiny_vlm"]["image_size"]}


@functools.lru_cache(maxsize=2)
def _pretraining_frames(seed: int, episodes_per_skill: int, image_size: int) -> dict:
    """The pretraining set, generated once per script run (the statistics and `--skills` both use it)."""
    from kuavo_train.data.demo_world.pretraining import pretraining_frames

    return pretraining_frames(seed, episodes_per_skill, image_size)


def own_pretraining_frames(checkpoint: str) -> dict:
    """A base's pretraining set, regenerated as its base_info.json records it. Refused in one line
    when the result is not the set the base recorded (other skills or another frame count: the
    pretraining code changed since the base was built), since its statistics would be other ones."""
    from kuavo_train.data.demo_world.pretraining import SKILLS

    info = base_pretraining_info(checkpoint)
    frames = _pretraining_frames(info["seed"], info["episodes_per_skill"], info["image_size"])
    skills = [s.instruction for s in SKILLS]
    if info.get("skills", skills) != skills or info.get("frames", len(frames["state"])) != len(frames["state"]):
        raise SystemExit(f"{checkpoint}: its pretraining set cannot be regenerated: base_info.json records "
                         f"{info.get('frames')} frames of {len(info.get('skills', skills))} skills, this code makes "
                         f"{len(frames['state'])} of {len(skills)} (the pretraining code changed since the base was "
                         "built)")
    return frames


def base_skill_stats(checkpoint: str) -> dict:
    """The normalization of a `kuavo-train build-base` folder's skills phase, from its pretraining set
    regenerated (`own_pretraining_frames`)."""
    from kuavo_train.training.pretrain import skill_stats

    return skill_stats(own_pretraining_frames(checkpoint))


def expert_chunk(world, steps: int) -> np.ndarray:
    """The scripted expert's next `steps` actions from the world's current state (on a copy)."""
    w = copy.deepcopy(world)
    out = []
    for _ in range(steps):
        a = w.expert_action()
        out.append(a)
        w.step(a)
    return np.asarray(out)


def closed_loop(act, task: str, root: str, episodes: int, seed: int, instruction: str | None = None) -> dict:
    """`episodes` held-out scenes stepped together: events reached per episode, where the
    grasping hand was when its claw first closed in episodes that never grasped, and how far
    from its mark (and from the nearest other mark of the scene) the object was let go where a
    place-type event was next and did not happen."""
    from kuavo_train.data.demo_world.world import PLACE_MARKS, SUCCESS_EVENTS
    from kuavo_train.envs.demo import KuavoDemoEnv

    envs = [KuavoDemoEnv(task, root) for _ in range(episodes)]
    for e in envs:
        e.task_description = instruction or e.task_description
    obs = [e.reset(seed=seed + i)[0] for i, e in enumerate(envs)]
    hand = envs[0].world.plan[0][0]  # the arm of the first grasp
    first_close: list[float | None] = [None] * episodes
    missed_release: list[float] = []
    other_mark: list[float] = []  # for the same releases: the nearest mark of the scene at another place
    expected = SUCCESS_EVENTS[task]
    done = np.zeros(episodes, dtype=bool)
    if hasattr(act, "reset"):
        act.reset()
    torch.manual_seed(seed)
    for _ in range(envs[0].world.max_steps):
        actions = act(envs, obs)
        for i, env in enumerate(envs):
            if done[i]:
                continue
            w = env.world
            was_closed, held, k = w.q[hand + 7] > 0.5, w.holder is not None, len(w.events)
            obs[i], _, terminated, truncated, _ = env.step(actions[i])
            if first_close[i] is None and w.q[hand + 7] > 0.5 and not was_closed:
                first_close[i] = float(np.linalg.norm(w.hand(hand)[:2] - w.obj[:2]))
            if held and w.holder is None and k < len(expected) and expected[k] in PLACE_MARKS and len(w.events) == k:
                target = w.scene.marks[PLACE_MARKS[expected[k]]]
                missed_release.append(float(np.linalg.norm(w.obj[:2] - target)))
                others = [float(np.linalg.norm(w.obj[:2] - m)) for m in w.scene.marks.values()
                          if not np.allclose(m, target)]
                other_mark.append(min(others, default=float("nan")))
            done[i] = terminated or truncated
    never = [d for e, d in zip(envs, first_close) if not e.world.events]
    return {"events": [len(e.world.events) for e in envs], "of": len(expected),
            "success": sum(e.world.success for e in envs),
            "never_grasped_close_distance": [d for d in never if d is not None],
            "never_closed": sum(d is None for d in never), "missed_release_distance": missed_release,
            "missed_release_other_mark": other_mark}


def target_fit(pred: np.ndarray, expert: np.ndarray) -> dict:
    """(n, steps, 2) planned hand targets against the expert's: their mean distance, the best
    constant chunk's (the expert's mean chunk), and the chunk-end correlation per coordinate that
    varies across the n samples."""
    corr = {name: float(np.corrcoef(pred[:, -1, axis], expert[:, -1, axis])[0, 1])
            for axis, name in enumerate("xy") if expert[:, -1, axis].std() > 1e-6 and pred[:, -1, axis].std() > 1e-9}
    return {"distance": float(np.linalg.norm(pred - expert, axis=-1).mean()),
            "constant_distance": float(np.linalg.norm(expert.mean(0, keepdims=True) - expert, axis=-1).mean()),
            "correlation": corr}


def first_chunk(chunk, task: str, root: str, scenes: int, seed: int) -> dict:
    """The first chunk on fresh scenes against the expert's: the grasping hand's (x, y) targets."""
    from kuavo_train.envs.demo import KuavoDemoEnv

    envs = [KuavoDemoEnv(task, root, scenes="seed") for _ in range(scenes)]
    obs = [e.reset(seed=seed + i)[0] for i, e in enumerate(envs)]
    hand = envs[0].world.plan[0][0]
    torch.manual_seed(seed)
    pred = np.asarray(chunk(envs, obs))[..., hand : hand + 2]
    expert = np.stack([expert_chunk(e.world, pred.shape[1]) for e in envs])[..., hand : hand + 2]
    return target_fit(pred, expert)


def skill_fit(plan, frames: dict, skill: int, offset: int, episodes: int, chunk_size: int = 10) -> dict | None:
    """The chunk `plan(batch)` makes from frame `offset` of each of the first `episodes` episodes of
    `skill` in `pretraining_frames` output that run at least `chunk_size` frames past it, against the
    actions the expert recorded from there: `target_fit` of the skill's hand (x, y), and `n`. None
    when no episode is long enough."""
    from kuavo_train.data.demo_world.pretraining import SKILLS
    from kuavo_train.training.pretrain import skill_observations

    starts = []
    for e in np.unique(frames["episode"][frames["skill"] == skill])[:episodes]:
        idx = np.flatnonzero(frames["episode"] == e)
        if offset + chunk_size <= len(idx):
            starts.append(idx[offset])
    if not starts:
        return None
    starts = np.asarray(starts)
    hand = SKILLS[skill].plan[0][0]
    torch.manual_seed(0)
    batch = skill_observations(frames, starts, [s.instruction for s in SKILLS])
    pred = np.asarray(plan(batch))[:, :chunk_size, hand : hand + 2]
    expert = frames["action"][starts[:, None] + np.arange(chunk_size)][..., hand : hand + 2]
    return {**target_fit(pred, expert), "n": len(starts)}


def fit_text(fit: dict) -> str:
    """`target_fit`'s numbers as the report prints them."""
    corr = ", ".join(f"{k} {v:+.2f}" for k, v in fit["correlation"].items()) or "n/a (constant)"
    return (f"hand targets {fit['distance']:.3f} from the expert's (best constant chunk {fit['constant_distance']:.3f}); "
            f"chunk-end correlation with the expert: {corr}")


def report(task: str, loop: dict, probe: dict | None, episodes: int, scenes: int,
           instruction: str | None = None) -> str:
    from kuavo_train.data.demo_world.world import GRASP_RADIUS, PLACE_TOL

    reached = collections.Counter(loop["events"])
    lines = [task + (f", instruction {instruction!r}" if instruction else ""),
             (f"  closed loop, {episodes} held-out scenes: success {loop['success']}/{episodes}; episodes by "
              f"key events reached (of {loop['of']}): {dict(sorted(reached.items()))}")]
    missed = loop["never_grasped_close_distance"]
    if missed or loop["never_closed"]:
        lines.append(f"  never grasped: {len(missed) + loop['never_closed']}; hand-object distance at the claw's first "
                     f"close: median {np.median(missed) if missed else float('nan'):.3f} (grasp radius {GRASP_RADIUS}); "
                     f"{loop['never_closed']} never closed it")
    released, other = loop["missed_release_distance"], np.asarray(loop["missed_release_other_mark"])
    if released:
        lines.append(f"  releases where a place was next and did not count: {len(released)}; object-mark distance: median "
                     f"{np.median(released):.3f} (a place counts within {PLACE_TOL})")
        if np.isfinite(other).any():
            lines.append(f"    the nearest other mark of the scene: median {np.nanmedian(other):.3f}; "
                         f"within {PLACE_TOL} of one in {int((other < PLACE_TOL).sum())} of them")
    if probe is None:
        return "\n".join(lines)
    lines.append(f"  first chunk, {scenes} new scenes: {fit_text(probe)}")
    return "\n".join(lines)


def skills_report(plan, checkpoint: str, skills: list[int], offsets: list[int], episodes: int) -> str:
    """`skill_fit` of each skill and offset on the base's own pretraining scenes and on fresh scenes
    (the same skills drawn with the next seed), as lines."""
    from kuavo_train.data.demo_world.pretraining import SKILLS

    info = base_pretraining_info(checkpoint)
    sets = {"own scenes": own_pretraining_frames(checkpoint),
            "fresh scenes": _pretraining_frames(info["seed"] + 1, min(info["episodes_per_skill"], episodes),
                                                info["image_size"])}
    lines = []
    for i in skills:
        lines.append(f"skill {i} {SKILLS[i].instruction!r}")
        for k in offsets:
            for name, frames in sets.items():
                fit = skill_fit(plan, frames, i, k, episodes)
                if fit is None:
                    lines.append(f"  frame {k}, {name}: no episode that long")
                    continue
                lines.append(f"  frame {k}, {name} ({fit['n']}): {fit_text(fit)}")
    return "\n".join(lines)


def main() -> None:
    from kuavo_train.data.demo_world.pretraining import SKILLS
    from kuavo_train.data.demo_world.tasks import TASKS_BY_NAME
    from kuavo_train.data.generated import EVAL_START_SEED

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a pretrained_model directory (a stage's, or an embedded base's)")
    ap.add_argument("--tasks", default=",".join(TASKS_BY_NAME))
    ap.add_argument("--data-root", default="outputs/demo/datasets")
    ap.add_argument("--episodes", type=int, default=20,
                    help="held-out scenes run closed loop per task (with --skills: episodes per skill and scene set)")
    ap.add_argument("--scenes", type=int, default=60, help="fresh scenes for the first-chunk probe")
    ap.add_argument("--instruction", help="run the closed loop with this instruction instead of the task's (e.g. a "
                    "pretraining skill's, to see whether a base follows its words); no first-chunk probe then")
    ap.add_argument("--skills", help="instead of the tasks: these pretraining skills (indexes, comma-separated), the "
                    "planned chunk against the expert's on the base's own pretraining scenes and on fresh ones")
    ap.add_argument("--frames", default="0,10", help="with --skills: the frame offsets in each episode to plan from")
    args = ap.parse_args()
    skills = [int(i) for i in args.skills.split(",")] if args.skills else []
    bad = [i for i in skills if not 0 <= i < len(SKILLS)]
    if bad:  # before the model loads
        raise SystemExit(f"--skills: no skill {bad[0]} (0..{len(SKILLS) - 1})")
    act, chunk = policy_actors(args.checkpoint)
    if skills:
        print(skills_report(chunk.plan, args.checkpoint, skills, [int(k) for k in args.frames.split(",")],
                            args.episodes), flush=True)
        return
    for task in args.tasks.split(","):
        root = f"{args.data_root}/{task}"
        loop = closed_loop(act, task, root, args.episodes, EVAL_START_SEED, args.instruction)
        probe = None if args.instruction else first_chunk(chunk, task, root, args.scenes, FRESH_SCENES)
        print(report(task, loop, probe, args.episodes, args.scenes, args.instruction), flush=True)


if __name__ == "__main__":
    main()
