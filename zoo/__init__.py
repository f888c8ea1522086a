"""The parlai-poly model zoo, installed as ``parlai_poly.zoo``.

Entries are addressed the ParlAI way, ``-mf zoo:parlai_poly/<entry>/model`` or
``--init-model zoo:parlai_poly/<entry>/model``, and installed into
``<datapath>/models/parlai_poly/<entry>/``. ``python -m parlai_poly.zoo list`` shows them.
"""
import os

from parlai_poly.errors import ZooError
from parlai_poly.zoo.registry import Card, entries, get, install_dir

__all__ = ["Card", "download", "entries", "get", "install_dir"]


def download(name: str, datapath: str) -> str:
    """Make entry ``name`` ready in ``datapath``; called by ParlAI for zoo:parlai_poly/<name>/..."""
    from parlai_poly.zoo import recipe

    card = get(name)
    target = install_dir(datapath, name)
    if card.files:  # install() checks its own marker against the card's sha256s
        from parlai_poly.zoo.fetch import RemoteFile, install

        files = [RemoteFile(**f) for f in card.files]
        install(files, target, card.zoo_path, os.path.join(datapath, "models", "downloads"))
        return target
    if recipe.is_installed(target):
        return target
    if card.recipe.get("build_on_use"):
        recipe.build(card, datapath, evaluate_it=False)
    else:
        minutes = card.recipe.get("minutes")
        took = f" (about {minutes} minutes on 2 CPU cores)" if minutes else ""
        raise ZooError(
            f"{card.zoo_path} has no download: it is built here by its recipe{took}. Run "
            f"`python -m parlai_poly.zoo build {name} --datapath {datapath}` once, then run "
            "this command again."
        )
    return target
