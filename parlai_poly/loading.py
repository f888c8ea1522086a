"""One way to open a model file of ours for inference, from anywhere (the Python API, the
cascade's other stages, distillation teachers, scripts): ``load_agent``.

It applies ParlAI 1.7.2's fixes itself (``compat.apply``), so no caller imports the agents
for their side effects, and it refuses a file that is not one of our agents' by name."""
from typing import Dict, Optional, Sequence

from .errors import ParlaiPolyError

KINDS = ("bi", "poly", "cross")


def load_agent(model_file: str, overrides: Optional[Dict] = None, kinds: Sequence[str] = KINDS, what: str = "model file"):
    """The agent that saved ``model_file`` (a path or ``zoo:`` path), with ``overrides`` over
    its saved options; ``kinds``: the agents accepted, ``what``: how errors name the file
    (an option, say ``--distill-teacher``)."""
    from parlai.core.agents import create_agent_from_model_file

    from . import compat

    compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI builds or parses anything
    overrides = dict(overrides or {})
    if model_file.startswith("zoo:") and overrides.get("datapath"):
        from parlai.core.build_data import modelzoo_path

        # ParlAI resolves zoo: paths in its default datapath, whatever the overrides say
        model_file = modelzoo_path(overrides["datapath"], model_file)
    agent = create_agent_from_model_file(model_file, overrides)
    kind = getattr(agent, "agent_name", None)
    if kind not in kinds:
        wanted = "model file (bi, poly or cross)" if set(kinds) == set(KINDS) else f"{' or '.join(kinds)} model file"
        found = f"it is a {kind} model" if kind in KINDS else "or its .opt is missing"
        raise ParlaiPolyError(f"{what} {model_file}: not a parlai-poly {wanted} ({found}).")
    return agent
