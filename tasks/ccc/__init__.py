"""CCC, the Chit-Chat Challenge corpus (PyPI ``chitchat-dataset``), as a ParlAI task.

``-t parlai_poly.tasks.ccc`` works because ParlAI imports a dotted task name as a module and
takes its ``DefaultTeacher``. ``python -m parlai_poly.tasks.ccc`` prints the fixed-candidates
file, and ``python -m benchmarks.ccc_baselines`` scores the reference baselines.
"""
from .agents import CccTeacher, DefaultTeacher, perspective_episodes
from .build import fixed_candidates_path

__all__ = ["CccTeacher", "DefaultTeacher", "fixed_candidates_path", "perspective_episodes"]
