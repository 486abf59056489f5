"""The stages' AdamW: fused by default, the same update and state layout as LeRobot's preset."""

import pytest
import torch
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

from kuavo_train.training.optim import build_optimizer, stock_param_groups


def config():
    # every hyper-parameter away from torch's defaults, so that one not passed on shows
    return SmolVLAConfig(optimizer_lr=3e-3, optimizer_betas=(0.8, 0.95), optimizer_eps=1e-6,
                         optimizer_weight_decay=0.1, push_to_hub=False)


def run(fused: bool, steps: int = 4):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (7, 300, 33)]
    frozen = torch.nn.Parameter(torch.randn(5, generator=gen), requires_grad=False)
    opt = build_optimizer(config(), [*params, frozen], fused=fused)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, [p.detach().clone() for p in params], frozen.detach().clone()


def test_fused_adamw_takes_the_presets_steps():
    stock, stock_params, stock_frozen = run(fused=False)
    fused, fused_params, fused_frozen = run(fused=True)
    assert fused.defaults["fused"] is True and not stock.defaults["fused"]
    assert fused.defaults["lr"] == 3e-3 and fused.defaults["betas"] == (0.8, 0.95) and fused.defaults["eps"] == 1e-6
    for a, b in zip(stock_params, fused_params):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert torch.equal(stock_frozen, fused_frozen)  # no gradient: untouched by both
    # lerobot-train --resume loads our optimizer state into its own AdamW: same keys per parameter
    s, f = stock.state_dict(), fused.state_dict()
    assert s["state"].keys() == f["state"].keys()
    assert all(s["state"][k].keys() == f["state"][k].keys() for k in s["state"])


def test_a_fused_state_on_disk_resumes_in_lerobot_train_and_in_ours(tmp_path):
    """Written as our checkpoints write it; read by LeRobot's loader (which lerobot-train --resume
    uses, type-checking every param-group field against its own AdamW) and by our fused resume."""
    from lerobot.optim.optimizers import load_optimizer_state, save_optimizer_state

    fused, params, frozen = run(fused=True)
    with stock_param_groups(fused):
        save_optimizer_state(fused, tmp_path)
    assert fused.param_groups[0]["fused"] is True  # as it was after writing

    def fresh(is_fused):
        return build_optimizer(config(), [*(torch.nn.Parameter(p.clone()) for p in params),
                                          torch.nn.Parameter(frozen.clone(), requires_grad=False)], fused=is_fused)

    stock = load_optimizer_state(fresh(False), tmp_path)  # what lerobot-train does
    assert not stock.param_groups[0]["fused"]
    ours = fresh(True)
    with stock_param_groups(ours):
        ours = load_optimizer_state(ours, tmp_path)
    assert ours.param_groups[0]["fused"] is True
    for loaded in (stock, ours):
        for k, v in fused.state_dict()["state"].items():
            torch.testing.assert_close(loaded.state_dict()["state"][k]["exp_avg_sq"], v["exp_avg_sq"], rtol=0, atol=0)
    # without the context a fused state on disk is refused by LeRobot's loader
    (tmp_path / "raw").mkdir()
    save_optimizer_state(fused, tmp_path / "raw")
    with pytest.raises(TypeError, match="Type mismatch"):
        load_optimizer_state(fresh(False), tmp_path / "raw")

