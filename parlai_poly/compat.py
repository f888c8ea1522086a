"""Every fix ParlAI 1.7.2 needs to run on today's torch, numpy and setuptools, in one place.

``apply()`` runs when ``parlai_poly.agents`` is imported, which ParlAI does while parsing
``-m parlai_poly.agents:...`` or loading a model file of ours, before any agent is built.
Fixes that cannot wait for that import (ParlAI's own modules import them first) are install
pins, listed in ``INSTALL_PINS`` and enforced by ``constraints.txt`` and ``setup.py``.
"""
import torch

INSTALL_PINS = {
    # parlai/core/opt.py does `import pkg_resources`, which setuptools 81 removed; the `parlai`
    # console script imports it before any plugin code can run, so only a pin can fix it.
    "setuptools": "<81",
    # BleuMetric.compute returns None without nltk, and the first validation then crashes.
    "nltk": "any",
}

_applied = False


def _plateau_scheduler_without_verbose():
    """torch 2.7 removed ReduceLROnPlateau(verbose=), which every ParlAI agent passes."""
    from parlai.nn import lr_scheduler

    def __init__(self, optimizer, patience, decay, warmup_updates, warmup_rate):
        lr_scheduler.ParlAILRScheduler.__init__(self, warmup_updates, warmup_rate)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, "min", factor=decay, patience=patience
        )

    lr_scheduler.ReduceOnPlateauLRScheduler.__init__ = __init__


FIXES = [_plateau_scheduler_without_verbose]


def apply():
    """Apply every fix once; safe to call many times."""
    global _applied
    if _applied:
        return
    for fix in FIXES:
        fix()
    _applied = True
