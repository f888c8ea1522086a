"""Small helpers for building and running our agents inside a test."""
from parlai.core.agents import create_agent, create_agent_from_model_file
from parlai.core.params import ParlaiParser

AGENTS = ("bi", "poly", "cross")
CHANCE = 1 / 8  # the synthetic task's 8 candidates


def model_options(agent, backbone, task, **extra):
    """Options that build ``agent`` on the tiny backbone for the synthetic task."""
    opts = dict(task, model=f"parlai_poly.agents:{agent}", hf_model=backbone, batchsize=16)
    if agent == "poly":
        opts["poly_n_codes"] = 4
    opts.update(extra)
    return opts


def train_options(agent, backbone, task, model_file, **extra):
    """Options that train ``agent`` on the synthetic task in seconds."""
    opts = model_options(
        agent,
        backbone,
        task,
        model_file=model_file,
        learningrate=1e-3,
        freeze_embeddings=False,
        warmup_updates=10,
        validation_every_n_epochs=-1,
        log_every_n_secs=1000,
        verbose=False,
        seed=2,  # deterministic: unseeded, the tiny cross-encoder fixture missed its R@1/8 >= 0.6 bar about one run in six
    )
    if agent == "cross":
        # a cross-encoder trained from scratch learns faster from the 8 inline candidates
        opts["candidates"] = "inline"
    opts.update(extra)
    return opts


def make_agent(*argv):
    """An agent built from command-line style arguments, as `parlai` would build it."""
    opt = ParlaiParser(True, True).parse_args(list(argv))
    return create_agent(opt)


def reload_agent(model_file, **overrides):
    return create_agent_from_model_file(model_file, overrides)


def rank(agent, text, candidates):
    """(ranked candidates, sorted scores) for one context."""
    agent.reset()
    agent.observe({"text": text, "label_candidates": candidates, "episode_done": True})
    reply = agent.act()
    return reply["text_candidates"], reply["sorted_scores"]
