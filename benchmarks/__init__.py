"""Measurement scripts: how fast and how accurate, against ParlAI and the field. Not installed
with the package (setup.py installs parlai_poly only); run each from the repository root as
``python -m benchmarks.NAME`` (or ``python benchmarks/NAME.py``), as its docstring says.
The smoke tests in tests/ import them from here."""
