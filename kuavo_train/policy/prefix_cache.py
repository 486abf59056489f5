"""An exact on-disk cache of SmolVLA's frozen prefix: per frame, every VLM layer's keys and values.

With `train_expert_only` the whole VLM is frozen. In LeRobot's attention masks
the image and language tokens attend only to each other, never to the state or
action tokens, so their hidden states in every VLM layer, and hence their keys
(after RoPE) and values, depend only on the frozen weights, the images and the
instruction. Stock training recomputes them at every step, and its backward
pass runs through those layers for the state token. Here they are computed once
per frame and stored; a step then runs only the state token through the VLM
layers (one query attending to the cached keys and values) and the action
expert. The loss and gradients are those of stock LeRobot's forward
(`tests/test_prefix_cache.py`).

Why the rest of the prefix may be dropped exactly: padded language tokens are
masked out as keys for every query, and their own outputs reach nothing (the
prefix outputs after the last layer are discarded); pad tokens after the state
(`prefix_length`) likewise, and they do not move the later position ids.

LeRobot has no training forward over a precomputed prefix, so `_suffix_forward`
restates the steps of `VLAFlowMatching.forward` and
`SmolVLMWithExpertModel.forward` (self-attention and cross-attention layers,
RoPE, the expert's position ids, eager attention) for the state and action
tokens, calling LeRobot's own layers and functions for each step. It is the
one hand-written copy of LeRobot's logic in the project; the equivalence tests
pin it to the installed version.

The entries are a level above the frozen-feature cache (`feature_cache.py`):
same namespace rule (a hash of the frozen weights, here the whole VLM), same
per-dataset, per-frame, per-precision stores, budget and disk-space checks,
and a digest of the exact inputs (all cameras' images after LeRobot's resize,
the camera masks, the instruction's tokens and mask) that must match for an
entry to be served. A frame whose entry cannot be stored (over
`feature_cache.prefix_max_gb`, or a full disk) is computed at the
vision-output level below, whose features are cached too.

An entry is one array [prefix tokens, layers x (K, V) x kv heads x head dim + 1]:
the last column is the token's pad mask, so one write holds all of it.
Entries keep the dtype the keys are computed in: float32, or bfloat16 under
bf16 autocast (exact for the precision that made them, never shared).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging

import torch
import torch.nn.functional as F  # noqa: N812

from kuavo_train.policy.feature_cache import FrozenFeatureCache

log = logging.getLogger(__name__)


def prefix_cacheable(policy) -> bool:
    """Whether the whole VLM is frozen and idle, so the prefix's keys and values never change."""
    vlm = policy.model.vlm_with_expert.vlm
    return not any(p.requires_grad for p in vlm.parameters())


class PrefixCache(FrozenFeatureCache):
    """Serve per-layer prefix keys and values by (dataset, frame); see the module docstring.

    `fallback` is the vision-output cache that computes a missed frame's image features."""

    DIGEST_WIDTH = 4  # the images' digest, then the instruction's

    def __init__(self, policy, root, *, max_bytes: int, resize=None, fallback: FrozenFeatureCache | None = None):
        super().__init__(policy, root, max_bytes=max_bytes, level="prefix", resize=resize)
        self.fallback = fallback
        vwe = self._vlm_expert
        self._layers = vwe.num_vlm_layers
        self._kv_width = vwe.num_key_value_heads * vwe.vlm.config.text_config.head_dim

    def _frozen(self, level: str) -> list:
        return [self._vlm_expert.vlm]

    def _key_extra(self) -> dict:
        cfg = self.policy.config
        return {"add_image_special_tokens": bool(cfg.add_image_special_tokens)}

    # ---- set-up ------------------------------------------------------------------
    def register(self, task_id: int, fingerprint: str, num_frames: int) -> None:
        super().register(task_id, fingerprint, num_frames)
        if self.fallback is not None:
            self.fallback.register(task_id, fingerprint, num_frames)

    def attach(self) -> None:
        model = self.policy.model
        if self._original is None:
            self._original = model.forward
            model.forward = self._forward
        if self.fallback is not None:
            self.fallback.attach()

    def detach(self) -> None:
        if self._original is not None:
            del self.policy.model.forward  # the class method shows again
            self._original = None
        if self.fallback is not None:
            self.fallback.detach()

    def _warn(self, why: str) -> None:
        # one disk-space warning for both levels: they share the folder and the disk
        if self.fallback is not None:
            self._warned = self._warned or self.fallback._warned
            super()._warn(why)
            self.fallback._warned = True
        else:
            super()._warn(why)

    def summary(self) -> str:
        out = f"{self.stats.summary()} at the prefix level"
        if self.fallback is not None:
            out += f"; below it {self.fallback.summary()}"
        return out

    def cached_frames(self, precision: str, cameras: dict[int, list[str]]):
        # A frame is left undecoded only when the level below holds its image features: a prefix miss
        # (say, another instruction) can then still be computed.
        return self.fallback.cached_frames(precision, cameras) if self.fallback is not None else None

    def _store_names(self, model_batch: dict) -> list[str]:
        # One store per camera set: the same frame seen through other cameras is another prefix.
        cameras = [k for k in self.policy.config.image_features if k in model_batch]
        return ["prefix-" + hashlib.sha256("\n".join(cameras).encode()).hexdigest()[:12]]

    # ---- one forward ---------------------------------------------------------------
    def _forward(self, images, img_masks, lang_tokens, lang_masks, state, actions, noise=None, time=None):
        """`VLAFlowMatching.forward` with the image and language tokens' keys and values from the cache."""
        model = self.policy.model
        if self._rows is None or self._vlm_expert.vlm.training or not prefix_cacheable(self.policy):
            return self._original(images, img_masks, lang_tokens, lang_masks, state, actions, noise, time)
        # The stock order of the random draws, so that a seeded step draws the same noise and time.
        if noise is None:
            noise = model.sample_noise(actions.shape, actions.device)
        if time is None:
            time = model.sample_time(actions.shape[0], actions.device)
        time_expanded = time[:, None, None]
        x_t = time_expanded * noise + (1 - time_expanded) * actions
        u_t = noise - actions
        kv, pad = self._prefix(images, img_masks, lang_tokens, lang_masks, state)
        state_emb = model.state_proj(state)
        state_emb = state_emb[:, None, :] if state_emb.ndim == 2 else state_emb
        suffix_embs, suffix_pad_masks, suffix_att_masks = model.embed_suffix(x_t, time)
        suffix_out = self._suffix_forward(kv, pad, state_emb, suffix_embs, suffix_pad_masks, suffix_att_masks)
        suffix_out = suffix_out[:, -model.config.chunk_size:].to(dtype=torch.float32)
        v_t = model.action_out_proj(suffix_out)
        return F.mse_loss(u_t, v_t, reduction="none")

    def _prefix(self, images, img_masks, lang_tokens, lang_masks, state):
        """Per row: keys and values [B, L, layers, 2, kv width] and the pad mask [B, L] of the cached tokens."""
        rows, store_name = self._rows, self._cameras[0]
        precision = self._precision(state.device)
        # Entries hold the language at its full `tokenizer_max_length`, so that a frame's entry does not
        # depend on how far its batch was padded (`pad_language_to: longest`); pad tokens are masked keys
        # for every query and do not count in the positions, so their keys and values never matter.
        extra = self.policy.config.tokenizer_max_length - lang_tokens.shape[1]
        tokens = F.pad(lang_tokens * lang_masks, (0, extra))
        # Two digests: the images (not for rows the loader left undecoded, whose frame fixes them) and the
        # instruction (always: the same frame may be trained with another instruction).
        digests = torch.cat([self._image_digests([*images, torch.stack(img_masks, 1)]),
                             self._digest(torch.cat([tokens, F.pad(lang_masks, (0, extra))], dim=1))], dim=1)
        stores = [self._store(precision, t, store_name) for t, _ in rows]
        hit = self._hits(stores, digests)
        miss = [r for r, h in enumerate(hit) if not h]
        hits = [r for r, h in enumerate(hit) if h]
        computed = None
        if miss:
            computed = self._compute_entries(images, img_masks, lang_tokens, lang_masks, state, miss)
            computed = F.pad(computed, (0, 0, 0, extra))  # pad tokens: zero keys and values, pad flag 0
        out = self._assemble(stores, rows, miss, hits, computed, state.device)
        # An undecoded row has no image digest to store with its entry: computed (from the image
        # features below), not stored.
        keep = [j for j, r in enumerate(miss) if not self._trusted[r]]
        if keep:
            self._save(stores, rows, [miss[j] for j in keep], computed[keep], digests)
        self.stats.hits += len(hits)
        self.stats.misses += len(miss)
        pad = out[..., -1] > 0.5
        # Trailing tokens that are padding in every row are keys no query sees: leave them out.
        n = int(pad.any(0).nonzero().max()) + 1
        b = out.shape[0]
        return out[:, :n, :-1].reshape(b, n, self._layers, 2, self._kv_width), pad[:, :n]

    @torch.no_grad()
    def _compute_entries(self, images, img_masks, lang_tokens, lang_masks, state, miss: list[int]) -> torch.Tensor:
        """Stock LeRobot's prefix pass (its `embed_prefix` and its KV-cache prefill) for rows `miss`."""
        from lerobot.policies.smolvla.modeling_smolvla import make_att_2d_masks

        model, rows = self.policy.model, self._rows
        sub = [rows[r] for r in miss]
        vision = (self.fallback.serving([t for t, _ in sub], [i for _, i in sub], self._batch,
                                        [self._trusted[r] for r in miss])
                  if self.fallback is not None else contextlib.nullcontext())
        with vision:
            embs, pad, att = model.embed_prefix([img[miss] for img in images], [m[miss] for m in img_masks],
                                                lang_tokens[miss], lang_masks[miss], state=state[miss])
        n = int(att[0].to(torch.int64).argmax())  # the state token: the first one with a new attention block
        embs, pad, att = embs[:, :n], pad[:, :n], att[:, :n]
        _, cache = self._vlm_expert.forward(attention_mask=make_att_2d_masks(pad, att),
                                            position_ids=torch.cumsum(pad, dim=1) - 1,
                                            past_key_values=None, inputs_embeds=[embs, None], use_cache=True)
        # DynamicCache holds [batch, kv heads, tokens, head dim] per layer.
        kv = torch.stack([torch.stack([layer.keys, layer.values], 1) for layer in cache.layers[: self._layers]], 1)
        kv = kv.permute(0, 4, 1, 2, 3, 5).reshape(len(miss), n, -1)  # [B, L, layers * 2 * kv heads * head dim]
        return torch.cat([kv, pad[..., None].to(kv.dtype)], dim=-1)

    def _suffix_forward(self, kv, prefix_pad, state_emb, suffix_embs, suffix_pad, suffix_att):
        """The state and action tokens through `SmolVLMWithExpertModel.forward`'s layers, with the cached
        tokens' keys and values in place of their hidden states. Returns the expert's normed output."""
        from lerobot.policies.smolvla.modeling_smolvla import make_att_2d_masks

        vwe = self._vlm_expert
        b, n = prefix_pad.shape
        device = state_emb.device
        # The prefix embeddings in stock are one concatenation of image, language and state embeddings.
        text = vwe.get_vlm_model().text_model
        dtype = torch.promote_types(torch.promote_types(state_emb.dtype, text.get_input_embeddings().weight.dtype),
                                    vwe.get_vlm_model().vision_model.dtype)
        hidden = [state_emb.to(dtype), suffix_embs]
        s = state_emb.shape[1]
        # The stock masks and positions over [cached tokens, state, actions]; keep the rows of state and actions.
        pad_masks = torch.cat([prefix_pad, torch.ones(b, s, dtype=torch.bool, device=device), suffix_pad], dim=1)
        att_masks = torch.cat([torch.zeros(b, n, dtype=torch.bool, device=device),
                               torch.ones(b, s, dtype=torch.bool, device=device),
                               suffix_att.to(torch.bool)], dim=1)
        att_2d = make_att_2d_masks(pad_masks, att_masks)[:, n:]
        positions = (torch.cumsum(pad_masks, dim=1) - 1)[:, n:]
        models = [text, vwe.lm_expert]
        layers = vwe.get_model_layers(models)
        head_dim = vwe.vlm.config.text_config.head_dim
        cross = "cross" in vwe.attention_mode
        for i in range(vwe.num_vlm_layers):
            k_cached, v_cached = (kv[:, :, i, j].reshape(b, n, -1, head_dim) for j in (0, 1))
            if not cross or (vwe.self_attn_every_n_layers > 0 and i % vwe.self_attn_every_n_layers == 0):
                att = self._self_attn(layers, hidden, i, positions, att_2d, k_cached, v_cached, b, head_dim)
            else:
                att = self._cross_attn(layers, hidden, i, positions, att_2d, k_cached, v_cached, b, head_dim, s)
            # After the last layer the state token's output reaches nothing: skip its projection and MLP.
            hidden = _mlp_blocks(layers, hidden, i, att, skip_first=i == vwe.num_vlm_layers - 1)
        return models[1].norm(hidden[1])

    def _self_attn(self, layers, hidden, i, positions, att_2d, k_cached, v_cached, b, head_dim):
        from lerobot.policies.smolvla.smolvlm_with_expert import apply_rope

        qs, ks, vs = [], [], []
        for m, h in enumerate(hidden):
            layer = layers[m][i]
            if layer is None:
                continue
            q, k, v = _qkv(layer, h)
            qs.append(q), ks.append(k), vs.append(v)
        q, k, v = torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)
        q, k = apply_rope(q, positions[:, : q.shape[1]]), apply_rope(k, positions[:, : k.shape[1]])
        keys, values = torch.cat([k_cached.to(k.dtype), k], 1), torch.cat([v_cached.to(v.dtype), v], 1)
        mask = att_2d[:, : q.shape[1], : keys.shape[1]]
        return [self._vlm_expert.get_attention_interface()(mask, b, head_dim, q, keys, values)]

    def _cross_attn(self, layers, hidden, i, positions, att_2d, k_cached, v_cached, b, head_dim, s):
        from lerobot.policies.smolvla.smolvlm_with_expert import apply_rope

        attend = self._vlm_expert.get_attention_interface()
        n = k_cached.shape[1]
        q, k, v = _qkv(layers[0][i], hidden[0])
        q, k = apply_rope(q, positions[:, :s]), apply_rope(k, positions[:, :s])
        keys, values = torch.cat([k_cached.to(k.dtype), k], 1), torch.cat([v_cached.to(v.dtype), v], 1)
        outs = [attend(att_2d[:, :s, : n + s], b, head_dim, q, keys, values)]
        expert = layers[1][i]
        if expert is None:
            return outs + [None]
        h = expert.input_layernorm(hidden[1]).to(dtype=expert.self_attn.q_proj.weight.dtype)
        eq = expert.self_attn.q_proj(h).view(*h.shape[:-1], -1, expert.self_attn.head_dim)
        ek = expert.self_attn.k_proj(keys.to(dtype=expert.self_attn.k_proj.weight.dtype).reshape(*keys.shape[:2], -1))
        ev = expert.self_attn.v_proj(values.to(dtype=expert.self_attn.v_proj.weight.dtype).reshape(*values.shape[:2], -1))
        ek = ek.view(*ek.shape[:-1], -1, expert.self_attn.head_dim)
        ev = ev.view(*ev.shape[:-1], -1, expert.self_attn.head_dim)
        pos = positions[:, s:]
        eq = apply_rope(eq, pos - torch.min(pos, dim=1, keepdim=True).values)
        return outs + [attend(att_2d[:, s:, : n + s], b, head_dim, eq, ek, ev)]


def _qkv(layer, h):
    h = layer.input_layernorm(h).to(dtype=layer.self_attn.q_proj.weight.dtype)
    shape = (*h.shape[:-1], -1, layer.self_attn.head_dim)
    return (layer.self_attn.q_proj(h).view(shape), layer.self_attn.k_proj(h).view(shape),
            layer.self_attn.v_proj(h).view(shape))


def _mlp_blocks(layers, hidden, i, att_outputs, skip_first: bool = False):
    """The output projection, residuals and MLP of layer `i`, as in `SmolVLMWithExpertModel.forward`."""
    out, start = [], 0
    for m, h in enumerate(hidden):
        layer = layers[m][i]
        att = att_outputs[m] if m < len(att_outputs) else att_outputs[0]
        if layer is None or (m == 0 and skip_first):
            out.append(h)
            start = start + h.shape[1] if len(att_outputs) == 1 else 0
            continue
        end = start + h.shape[1]
        if att.dtype != layer.self_attn.o_proj.weight.dtype:
            att = att.to(layer.self_attn.o_proj.weight.dtype)
        e = layer.self_attn.o_proj(att[:, start:end])
        e += h
        residual = e.clone()
        e = layer.mlp(layer.post_attention_layernorm(e))
        e += residual
        out.append(e)
        start = end if len(att_outputs) == 1 else 0
    return out


def create_cache(policy, settings, *, log_prefix: str = "") -> FrozenFeatureCache | None:
    """The highest exact cache level the model allows (prefix, then vision output), or None; logs which."""
    vision = FrozenFeatureCache.create(policy, settings, log_prefix=log_prefix)
    if vision is None or not getattr(settings, "prefix", False) or not prefix_cacheable(policy):
        if vision is not None and getattr(settings, "prefix", False):
            log.info("%sprefix cache: off, the VLM is trained (train_expert_only=false)", log_prefix)
        return vision
    try:
        cache = PrefixCache(policy, settings.dir, max_bytes=int(settings.prefix_max_gb * 2**30),
                            resize=policy.config.resize_imgs_with_padding, fallback=vision)
    except OSError as exc:
        log.warning("%sprefix cache: off, cannot write to %s (%s)", log_prefix, settings.dir, exc.strerror or exc)
        return vision
    log.info("%sprefix cache: on, every VLM layer's keys and values of the image and language tokens are computed "
             "once per frame (budget %.1f GiB)", log_prefix, settings.prefix_max_gb)
    return cache
