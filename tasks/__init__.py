"""Task-side code for parlai-poly, installed as ``parlai_poly.tasks``: teachers and data recipes."""
