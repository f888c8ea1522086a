"""Distillation between cross-, poly- and bi-encoders.

- ``losses``: the distillation losses, pure tensor functions (KL, MarginMSE, and the
  Trans-Encoder pair: BCE on sigmoid pseudo-labels, MSE regression).
- ``teacher``: any of our model files scoring the contexts and candidate texts a student
  sees, optionally through ``score_cache`` (safetensors + JSON on disk, keyed by sha256).
- ``student``: the ``--distill-*`` options every agent of ours takes as a student.
- ``transencoder``: the unsupervised bi -> cross -> bi loop (``python -m``).
- ``report``: tables and a plot from what the two above write (``python -m``).

Nothing here is imported by ``parlai_poly.agents`` but ``student`` (and what it needs), so
loading an agent stays as cheap as before.
"""
