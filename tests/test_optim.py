"""The stages' AdamW: fused by default, the same update and state layout as LeRobot's preset."""

import torch
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

from kuavo_train.training.optim import build_optimizer


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
    unfused = build_optimizer(config(), [torch.nn.Parameter(p.clone()) for p in fused_params] + [
        torch.nn.Parameter(fused_frozen.clone(), requires_grad=False)], fused=False)
    unfused.load_state_dict(f)

