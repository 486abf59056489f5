"""Deploy one SmolVLA checkpoint for all its tasks, switched by the language instruction.

    policy = SmolVLAPolicyWrapper.from_pretrained("outputs/demo/run")   # run dir, checkpoint, or pretrained_model/
    action = policy.select_action({"observation.images": {...}, "observation.state": state, "task": [instruction]})

What the wrapper adds to stock LeRobot (it computes actions through the stock
path: saved preprocessor -> SmolVLAPolicy.predict_action_chunk -> saved
postprocessor, so outputs equal stock LeRobot's for the same inputs and noise):
- the observation formats a Kuavo controller has: per-camera LeRobot keys, or the
  spec's single `observation.images` (dict camera -> image, or a stacked array in
  the checkpoint's camera order); numpy or torch; HWC uint8 (0..255) or CHW float
  (0..1); batched or not. Floats must be channels-first and uint8 channels-last:
  that is how cameras and LeRobot datasets deliver them, and it keeps the
  layout unambiguous;
- one action queue per batch row, and a new chunk as soon as any row's
  instruction changes (stock LeRobot keeps executing the old task's chunk). When
  a new chunk is needed it is computed for the whole batch and every row's queue
  restarts from it: the simplest rule under which no row ever executes an action
  produced for another instruction;
- instructions checked against the tasks the checkpoint was trained on
  (`kuavo_tasks.json`), and a warning when the tokenizer cuts an instruction;
- one-line errors naming the key and the expected shape for bad inputs;
- each task's own state and action dims: when the tasks of a run have different
  vectors (task 4 adds base-command dims), the model acts in their union; the
  wrapper takes a task's own state (or the union's) and returns that task's own
  action dims, named by `action_names(instruction)`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from kuavo_train.errors import KuavoError
from kuavo_train.files import replace_dir, staging_dir
from kuavo_train.policy import adapters, factory

log = logging.getLogger(__name__)

STATE_KEY = "observation.state"
IMAGES_KEY = "observation.images"
TASKS_FILE = "kuavo_tasks.json"


class WrapperInputError(KuavoError):
    """An observation the policy cannot take; `str()` is one line naming the key."""


class NonFiniteActionError(KuavoError):
    """The model produced NaN or inf: never handed to a robot."""


class UnknownInstructionError(WrapperInputError):
    """An instruction the checkpoint was not trained on."""


def resolve_pretrained_dir(path) -> Path:
    """A run directory (its final model), a checkpoint folder or a `pretrained_model/` folder."""
    p = Path(path)
    if (p / "run.json").is_file():
        from kuavo_train.run_state import RunState

        state = RunState.load(p)  # a damaged run.json: one line
        done = [(s.get("task_id", 0), name) for name, s in state.data.get("stages", {}).items() if s.get("status") == "complete"]
        if not done:
            raise factory.PolicyLoadError(f"run {p} has no complete stage yet: nothing to load")
        final = state.final_checkpoint(max(done)[1]) / factory.PRETRAINED_DIR
        if not (final / "config.json").is_file():
            raise factory.PolicyLoadError(f"run {p}: its final checkpoint {final} is missing (deleted or moved); "
                                          "give a checkpoint folder instead, or train the stage again")
        return final
    if (p / factory.PRETRAINED_DIR / "config.json").is_file():
        return p / factory.PRETRAINED_DIR
    if (p / "config.json").is_file():
        return p
    raise factory.PolicyLoadError(
        f"{p} is not a checkpoint (expected a run directory with run.json, a checkpoint with pretrained_model/, "
        "or a pretrained_model/ folder with config.json)"
    )


def unknown_instruction_message(instruction: str, known: Mapping[str, str]) -> str:
    """One line: the refused instruction whole, and the first character where it differs from
    the closest known one, marked with `^` in that instruction. Closest: the longest shared
    beginning (what the message shows), then similarity (difflib's ratio)."""
    msg = f"task: {instruction!r} is not an instruction this model was trained on"
    if not known:
        return msg
    import difflib

    def shared_beginning(text: str) -> int:
        return next((k for k, (a, b) in enumerate(zip(instruction, text)) if a != b), min(len(instruction), len(text)))

    name, closest = max(known.items(), key=lambda kv: (shared_beginning(kv[1]),
                                                        difflib.SequenceMatcher(None, instruction, kv[1]).ratio()))
    i = shared_beginning(closest)
    lo, hi = max(0, i - 30), i + 30
    shown = ("..." if lo else "") + closest[lo:i] + "^" + closest[i:hi] + ("..." if hi < len(closest) else "")
    if i < min(len(instruction), len(closest)):
        how = f"differs from {name}'s at character {i + 1} ({instruction[i]!r} instead of {closest[i]!r})"
    elif i == len(instruction):
        how = f"stops at character {i + 1} where {name}'s goes on"
    else:
        how = f"goes on at character {i + 1} where {name}'s ends"
    return f"{msg}; closest: it {how}: {shown!r}"


class SmolVLAPolicyWrapper:
    def __init__(self, policy, preprocessor, postprocessor, *, tasks: list[dict], source: Path,
                 allow_unknown_instructions: bool = False, strict_image_size: bool = True, seed: int | None = None):
        self.policy, self.preprocessor, self.postprocessor = policy, preprocessor, postprocessor
        self.tasks, self.source = tasks, source
        self.allow_unknown_instructions = allow_unknown_instructions
        self.strict_image_size = strict_image_size
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._warned: set[str] = set()
        cfg = policy.config
        # every visual input: ours are observation.images.<camera>; a checkpoint trained on
        # LeRobot's single-camera envs (benchmark --observation stock) has observation.image
        self.camera_keys = list(cfg.image_features)
        self.state_dim = int(cfg.input_features[STATE_KEY].shape[0])
        self.action_dim = int(cfg.output_features["action"].shape[0])
        self._by_instruction = {t["instruction"]: t for t in tasks}
        self.reset()

    # ---- each task's own dims ------------------------------------------------------
    def _task_index(self, instruction: str, label: str) -> list[int]:
        t = self._by_instruction.get(instruction, {})
        full = self.state_dim if label == "state" else self.action_dim
        return list(t.get(f"{label}_index", range(full)))

    def action_names(self, instruction: str) -> list[str]:
        """Names of the action dims returned for this instruction (its task's own dims, in its own order)."""
        t = self._by_instruction.get(instruction, {})
        return list(t.get("action_names", [f"action_{i}" for i in range(self.action_dim)]))

    def _state_fill(self) -> torch.Tensor:
        """The union mean of the state, for dims a task does not have (normalizes to 0, as in training)."""
        stats = factory.processor_stats(self.preprocessor).get(STATE_KEY, {})
        if "mean" in stats:
            return torch.as_tensor(stats["mean"], dtype=torch.float32).reshape(-1).cpu()
        return torch.zeros(self.state_dim)

    def _own_state(self, state: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        if state.shape[1] == self.state_dim:
            return state
        own = {len(self._task_index(t, "state")) for t in tasks}
        if own != {state.shape[1]}:
            sizes = sorted({self.state_dim, *own})
            raise WrapperInputError(f"{STATE_KEY}: expected {' or '.join(map(str, sizes))} values per row (the task's own "
                                    f"state, or the model's {self.state_dim}); got {state.shape[1]}")
        out = self._state_fill().repeat(state.shape[0], 1)
        for r, t in enumerate(tasks):
            out[r, self._task_index(t, "state")] = state[r]
        return out

    def _own_action(self, chunk: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        """(B, T, union) -> (B, T, own dims of the rows' task)."""
        idx = {tuple(self._task_index(t, "action")) for t in tasks}
        if len(idx) > 1:
            raise WrapperInputError("task: the batch mixes tasks with different action dims "
                                    f"({sorted(len(i) for i in idx)}); batch rows of such tasks separately")
        return chunk[..., list(idx.pop())]

    # ---- loading -----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, device: str | None = None, allow_unknown_instructions: bool = False,
                        strict_image_size: bool = True, seed: int | None = None) -> "SmolVLAPolicyWrapper":
        import dataclasses

        pretrained = resolve_pretrained_dir(path)
        cfg = factory.read_pretrained_config(pretrained)
        if device is not None:
            cfg = dataclasses.replace(cfg, device=device)
        policy = factory.load_policy(pretrained, cfg)
        policy.to(cfg.device)
        policy.eval()
        pre, post = factory.make_processors(cfg, pretrained_path=pretrained, device=cfg.device)
        tasks_file = pretrained / TASKS_FILE
        try:
            tasks = json.loads(tasks_file.read_text())["tasks"] if tasks_file.is_file() else []
        except (ValueError, KeyError) as exc:
            raise factory.PolicyLoadError(f"{tasks_file} is corrupt ({type(exc).__name__}: {str(exc)[:80]}): copy the checkpoint again") from None
        wrapper = cls(policy, pre, post, tasks=tasks, source=pretrained,
                      allow_unknown_instructions=allow_unknown_instructions or not tasks,
                      strict_image_size=strict_image_size, seed=seed)
        wrapper._warn_truncated()
        return wrapper

    def _warn_truncated(self) -> None:
        """Nobody should deploy a task whose distinguishing words the tokenizer cuts off."""
        from transformers import AutoTokenizer

        cfg = self.policy.config
        tok = AutoTokenizer.from_pretrained(cfg.vlm_model_name)
        self.truncated = {}
        for t in self.tasks:
            ids = tok(t["instruction"] + "\n")["input_ids"]
            if len(ids) > cfg.tokenizer_max_length:
                kept = tok.decode(ids[: cfg.tokenizer_max_length])
                self.truncated[t["name"]] = kept
                log.warning("task %s: instruction has %d tokens, the model sees only the first %d: %r",
                            t["name"], len(ids), cfg.tokenizer_max_length, kept)

    # ---- properties --------------------------------------------------------------
    @property
    def config(self):
        return self.policy.config

    @property
    def instructions(self) -> list[str]:
        return [t["instruction"] for t in self.tasks]

    @property
    def chunk_size(self) -> int:
        return int(self.config.chunk_size)

    @property
    def n_action_steps(self) -> int:
        return int(self.config.n_action_steps)

    # ---- inputs ------------------------------------------------------------------
    def _as_tensor(self, key: str, value) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu()
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        raise WrapperInputError(f"{key}: expected a numpy array or torch tensor, got {type(value).__name__}")

    def _image(self, key: str, value, tasks: list[str]) -> torch.Tensor:
        """One camera -> float32 (B, C, H, W) in [0, 1]."""
        t = self._as_tensor(key, value)
        c, h, w = self.config.input_features[key].shape
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4:
            raise WrapperInputError(f"{key}: expected an image (H, W, 3) uint8 or (3, H, W) float, optionally batched; got shape {tuple(t.shape)}")
        if t.dtype == torch.uint8:
            if t.shape[-1] != c:
                raise WrapperInputError(f"{key}: uint8 images must be channels-last (H, W, {c}); got shape {tuple(t.shape)}")
            t = t.permute(0, 3, 1, 2).to(torch.float32).div(255)
        elif t.is_floating_point():
            if t.shape[1] != c:
                raise WrapperInputError(f"{key}: float images must be channels-first ({c}, H, W) in [0, 1]; got shape {tuple(t.shape)}")
            t = t.to(torch.float32)
            if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
                raise WrapperInputError(f"{key}: float images must be finite and within [0, 1]")
        else:
            raise WrapperInputError(f"{key}: images must be uint8 (0..255) or float (0..1); got {t.dtype}")
        # each task's own camera size (tasks may differ; the policy resizes them all), else the checkpoint's
        known = {tuple(self._by_instruction.get(name, {}).get("image_sizes", {}).get(key, (h, w))) for name in tasks}
        if self.strict_image_size and tuple(t.shape[-2:]) not in known:
            sizes = " or ".join(f"{a}x{b}" for a, b in sorted(known))
            raise WrapperInputError(f"{key}: expected {sizes} images (the camera size of the task's data); "
                                    f"got {t.shape[-2]}x{t.shape[-1]} (strict_image_size=False lets the policy "
                                    "resize any size, as it does in training)")
        return t

    def _camera_inputs(self, obs: Mapping) -> dict[str, object]:
        per_camera = {k: v for k, v in obs.items() if k.startswith(IMAGES_KEY + ".") or k in self.camera_keys}
        if IMAGES_KEY in obs:
            if per_camera:
                raise WrapperInputError(f"{IMAGES_KEY}: give images either as {IMAGES_KEY} or as per-camera keys, not both")
            imgs = obs[IMAGES_KEY]
            if isinstance(imgs, Mapping):
                per_camera = {(k if k.startswith(IMAGES_KEY + ".") else f"{IMAGES_KEY}.{k}"): v for k, v in imgs.items()}
            else:
                t = self._as_tensor(IMAGES_KEY, imgs)
                n = len(self.camera_keys)
                axis = 0 if t.ndim == 4 else 1 if t.ndim == 5 else None
                if axis is None or t.shape[axis] != n:
                    raise WrapperInputError(
                        f"{IMAGES_KEY}: a stacked array must be (n_cameras={n}, ...) or (B, {n}, ...) in the order "
                        f"{[k.split('.')[-1] for k in self.camera_keys]}; got shape {tuple(t.shape)}")
                per_camera = {k: t.select(axis, i) for i, k in enumerate(self.camera_keys)}
        missing = [k for k in self.camera_keys if k not in per_camera]
        if missing:
            raise WrapperInputError(f"{missing[0]}: missing camera (expected {[k.split('.')[-1] for k in self.camera_keys]})")
        extra = [k for k in per_camera if k not in self.camera_keys]
        if extra:
            raise WrapperInputError(f"{extra[0]}: unknown camera (this checkpoint has {[k.split('.')[-1] for k in self.camera_keys]})")
        return per_camera

    def _instructions(self, obs: Mapping) -> list[str]:
        if "task" not in obs:
            raise WrapperInputError(f"task: missing; give the instruction(s), one per batch row (known: {self._known()})")
        task = obs["task"]
        tasks = [task] if isinstance(task, str) else list(task) if isinstance(task, (list, tuple)) else None
        if not tasks or not all(isinstance(t, str) for t in tasks):
            raise WrapperInputError("task: expected a string or a list of strings, one per batch row")
        known = set(self.instructions)
        for t in tasks:
            if t in known:
                continue
            if not self.allow_unknown_instructions:
                raise UnknownInstructionError(unknown_instruction_message(t, self._named_instructions()) +
                                              f" (known: {self._known()})")
            if t not in self._warned:
                self._warned.add(t)
                # a model with per-task adapters has no task to run an unknown instruction with
                runs = "; the shared base runs it, without any task's adapter" if adapters.names(self.policy) else ""
                log.warning("%s; used anyway (allow_unknown_instructions)%s",
                            unknown_instruction_message(t, self._named_instructions()).removeprefix("task: "), runs)
        return tasks

    def _named_instructions(self) -> dict[str, str]:
        return {t.get("name", f"task {i + 1}"): t["instruction"] for i, t in enumerate(self.tasks)}

    def _known(self) -> str:
        return "; ".join(repr(i[:60] + ("..." if len(i) > 60 else "")) for i in self.instructions) or "none recorded"

    def to_batch(self, obs: Mapping) -> tuple[dict, bool]:
        """Checked LeRobot batch (B-first tensors + task list) and whether the input was unbatched."""
        if not isinstance(obs, Mapping):
            raise WrapperInputError(f"observation: expected a dict, got {type(obs).__name__}")
        tasks = self._instructions(obs)
        own_dim = len(self._task_index(tasks[0], "state"))
        if STATE_KEY not in obs:
            raise WrapperInputError(f"{STATE_KEY}: missing; expected shape ({own_dim},) or (B, {own_dim})")
        state = self._as_tensor(STATE_KEY, obs[STATE_KEY])
        unbatched = state.ndim == 1
        state = state.unsqueeze(0) if unbatched else state
        if state.ndim != 2 or state.shape[1] not in (self.state_dim, own_dim):
            raise WrapperInputError(f"{STATE_KEY}: expected shape ({own_dim},) or (B, {own_dim}); got {tuple(state.shape) if not unbatched else tuple(state.shape[1:])}")
        if not (state.is_floating_point() or state.dtype in (torch.int32, torch.int64)):
            raise WrapperInputError(f"{STATE_KEY}: expected a float array; got {state.dtype}")
        state = state.to(torch.float32)
        if not torch.isfinite(state).all():
            raise WrapperInputError(f"{STATE_KEY}: contains NaN or inf")
        b = state.shape[0]
        if len(tasks) == 1 and b > 1:
            tasks = tasks * b
        if len(tasks) != b:
            raise WrapperInputError(f"task: {len(tasks)} instructions for a batch of {b} ({STATE_KEY} has {b} rows)")
        batch = {STATE_KEY: self._own_state(state, tasks), "task": tasks}
        for key, value in self._camera_inputs(obs).items():
            img = self._image(key, value, tasks)
            if img.shape[0] != b:
                raise WrapperInputError(f"{key}: batch size {img.shape[0]} differs from {STATE_KEY}'s {b}")
            batch[key] = img
        return batch, unbatched

    # ---- actions -----------------------------------------------------------------
    @torch.no_grad()
    def _chunk(self, batch: dict) -> torch.Tensor:
        """(B, chunk, action_dim) in robot units, through the stock pre/post-processors."""
        noise = None
        if self._generator is not None:
            cfg = self.config
            noise = torch.randn((len(batch["task"]), cfg.chunk_size, cfg.max_action_dim), generator=self._generator)
            noise = noise.to(next(self.policy.parameters()).device)

        def run(task_id: int, part: dict, part_noise) -> torch.Tensor:
            with adapters.for_task(self.policy, task_id):
                return self.postprocessor(self.policy.predict_action_chunk(
                    self.preprocessor(part), noise=part_noise)).detach().cpu()

        groups = self._rows_by_adapter(batch["task"])
        if len(groups) == 1:  # the usual case: the batch and the noise go whole, no per-row copy
            (task_id,) = groups
            chunk = run(task_id, dict(batch), noise)
        else:
            chunk = None
            for task_id, rows in groups.items():
                part = {k: (v[rows] if torch.is_tensor(v) else [v[r] for r in rows]) for k, v in batch.items()}
                out = run(task_id, part, None if noise is None else noise[rows])
                chunk = out.new_empty((len(batch["task"]), *out.shape[1:])) if chunk is None else chunk
                chunk[rows] = out
        if not bool(torch.isfinite(chunk).all()):
            # a robot must never receive NaN: refuse rather than act
            raise NonFiniteActionError(f"the policy of {self.source} produced non-finite actions for {batch['task'][0][:60]!r}: "
                                       "check the observation's values and the checkpoint")
        return chunk

    def _rows_by_adapter(self, tasks: list[str]) -> dict[int, list[int]]:
        """Batch rows grouped by the task whose adapter runs them (one group when the model has none)."""
        if not adapters.names(self.policy):
            return {0: list(range(len(tasks)))}
        groups: dict[int, list[int]] = {}
        for r, t in enumerate(tasks):
            groups.setdefault(int(self._by_instruction.get(t, {}).get("task_id", 0)), []).append(r)
        return groups

    def predict_action_chunk(self, obs: Mapping) -> torch.Tensor:
        batch, unbatched = self.to_batch(obs)
        chunk = self._own_action(self._chunk(batch), batch["task"])
        return chunk[0] if unbatched else chunk

    def select_action(self, obs: Mapping) -> torch.Tensor:
        batch, unbatched = self.to_batch(obs)
        tasks = batch["task"]
        if self._queue is None or self._next >= self._queue.shape[1] or self._tasks != tasks:
            self._queue = self._own_action(self._chunk(batch), tasks)[:, : self.n_action_steps]
            self._tasks, self._next = list(tasks), 0
        action = self._queue[:, self._next]
        self._next += 1
        return action[0] if unbatched else action

    def reset(self) -> None:
        """Forget queued actions (call at every episode start)."""
        self._queue: torch.Tensor | None = None
        self._tasks: list[str] | None = None
        self._next = 0
        self.policy.reset()


def export_merged(path, out: Path | None = None) -> dict[str, Path]:
    """One plain stock checkpoint per task of a model with per-task adapters (base and the task's
    adapter merged): `<out>/<task name>/pretrained_model`, each written whole or not at all.
    `out` defaults to `merged/` in the run directory when given a run; a checkpoint needs `out`
    (beside it, a later checkpoint of the same name would replace it)."""

    pretrained = resolve_pretrained_dir(path)
    if out is None and not (Path(path) / "run.json").is_file():
        raise factory.PolicyLoadError(f"{path} is a checkpoint, not a run directory: say where the merged models go "
                                      f"(--out DIR)")
    cfg = factory.read_pretrained_config(pretrained)
    policy = factory.load_policy(pretrained, cfg)
    if not adapters.names(policy):
        raise factory.PolicyLoadError(f"{pretrained} has no per-task adapters: it is already one stock model for "
                                      "all its tasks (strategy lora_per_task writes adapters)")
    if not (pretrained / TASKS_FILE).is_file():
        raise factory.PolicyLoadError(f"{pretrained} has no {TASKS_FILE} (kuavo-train writes it with every "
                                      f"checkpoint): which adapter is which task is unknown")
    tasks = json.loads((pretrained / TASKS_FILE).read_text())["tasks"]
    out = Path(out) if out is not None else Path(path) / "merged"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for t in tasks:
        if adapters.adapter_name(t["task_id"]) not in adapters.names(policy):
            continue
        tmp = staging_dir(out, t["name"])
        try:
            dest = adapters.export_merged(policy, pretrained, t["task_id"], tmp)
            (dest / TASKS_FILE).write_text(json.dumps({"tasks": [t]}, indent=2) + "\n")  # what this model knows
            replace_dir(tmp, out / t["name"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        written[t["name"]] = out / t["name"] / factory.PRETRAINED_DIR
    return written
