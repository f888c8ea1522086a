"""Each ParlAI 1.7.2 fix in parlai_poly.compat, shown to be needed and to work."""
import pytest
import torch

from parlai_poly import compat
from helpers import make_agent


def test_torch_no_longer_takes_verbose_for_plateau_scheduler():
    """Why the fix exists: ParlAI passes verbose=True, which torch >= 2.7 rejects."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError):
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", verbose=True)


def test_parlai_plateau_scheduler_builds_and_decays_after_the_fix():
    from parlai.nn.lr_scheduler import ParlAILRScheduler

    compat.apply()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt = {"lr_scheduler": "reduceonplateau", "lr_scheduler_patience": 0, "lr_scheduler_decay": 0.5, "warmup_updates": -1, "warmup_rate": 1e-4, "max_train_steps": -1, "lr_scheduler_invsqrt_decay": 1e-4}
    scheduler = ParlAILRScheduler.lr_scheduler_factory(opt, optimizer, {}, hard_reset=True)
    scheduler.valid_step({"loss": 1.0})
    scheduler.valid_step({"loss": 2.0})  # no improvement: decay by 0.5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def test_setuptools_pin_keeps_pkg_resources_for_parlai():
    import pkg_resources  # noqa: F401  parlai/core/opt.py imports it at import time
    import parlai.core.opt  # noqa: F401


def test_nltk_present_so_bleu_is_computed():
    from parlai.core.metrics import BleuMetric

    assert BleuMetric.compute("the cat sat down", ["the cat sat down"]) is not None


@pytest.mark.parametrize("given, used", [("0", 0.0), ("0.05", 0.05)])
def test_weight_decay_option_reaches_the_optimizer_even_at_zero(tiny_backbone, given, used):
    agent = make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "--weight-decay", given)
    assert [g["weight_decay"] for g in agent.optimizer.param_groups] == [used] * len(agent.optimizer.param_groups)
