"""SmolVLA whose training loss skips the action dims a sample's task does not have.

When tasks have different action vectors (task 4 adds base-command dims), the
policy acts in their union (kuavo_train/data/features.py) and each sample
carries `action_dim_is_pad`. Stock `SmolVLAPolicy.forward` averages over every
real dim, so a task's absent dims would be trained towards their fill value.
This subclass changes only that average: weights, config, processors, saving
and inference are the stock class's, so stock LeRobot loads what it writes
(as a plain `SmolVLAPolicy`). Without a mask, or with an all-true one, it is
exactly the stock forward. LeRobot has no per-dim loss mask, hence this.
"""

from __future__ import annotations

from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

from kuavo_train.data.frames import DIM_PAD_KEY  # (B, action dims), True where the sample's task lacks the dim


class MaskedSmolVLAPolicy(SmolVLAPolicy):
    def forward(self, batch, noise=None, time=None, reduction: str = "mean"):
        dim_pad = batch.get(DIM_PAD_KEY)
        if dim_pad is None or not bool(dim_pad.any()):
            return super().forward(batch, noise=noise, time=time, reduction=reduction)
        # The stock forward's steps, with the per-sample dim mask in the average.
        images, img_masks = self.prepare_images(batch)
        state = self.prepare_state(batch)
        actions = self.prepare_action(batch)
        losses = self.model.forward(images, img_masks, batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK],
                                    state, actions, noise, time)
        dim = self.config.action_feature.shape[0]
        weight = (~dim_pad)[:, None, :dim].to(device=losses.device, dtype=losses.dtype)
        pad = batch.get("action_is_pad")
        if pad is not None:
            weight = weight * (~pad).to(device=losses.device).unsqueeze(-1).to(losses.dtype)
        losses = losses[:, :, :dim] * weight
        if reduction == "none":
            per_sample = losses.sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp_min(1)
            return per_sample, {"loss": per_sample.mean().item()}
        loss = losses.sum() / weight.sum().clamp_min(1)
        return loss, {"loss": loss.item()}
