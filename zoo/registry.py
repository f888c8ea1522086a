"""The zoo's entries, one model card each: ``zoo/cards/<entry>.md``.

A card is markdown with a YAML front matter, as on the Hugging Face hub: the front matter is
the entry as data (agent, backbone, where its files come from, the metrics it must reach and
those measured), the body is the card people read. Extra cards (a private zoo) can be added
with the environment variable ``PARLAI_POLY_ZOO_CARDS``, a directory of such files.

An entry's files come either from ``files`` (URLs with sha256 and size, fetched and checked
by ``parlai_poly.zoo.fetch``) or from its ``recipe`` (trained here by
``python -m parlai_poly.zoo build <entry>``; a recipe marked ``build_on_use`` takes seconds and
is built the first time ParlAI asks for the entry). A recipe's ``keep`` says which weights its
training installs: ``best`` (ParlAI's best validation, the default) or ``last`` (the last
update's, as sentence-transformers keeps them).
"""
import glob
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from parlai_poly.errors import ZooError
from parlai_poly.zoo_hook import ZOO_PREFIX

CARDS_DIR = os.path.join(os.path.dirname(__file__), "cards")
EXTRA_CARDS_ENV = "PARLAI_POLY_ZOO_CARDS"
REQUIRED = ("name", "description", "agent", "backbone")
# which weights a recipe's training installs: ParlAI's best validation, or the last update's
KEEP_RULES = ("best", "last")


@dataclass
class Card:
    name: str
    description: str
    agent: str  # bi | poly | cross
    backbone: str
    path: str  # the card's markdown file
    body: str = ""
    files: List[Dict[str, Any]] = field(default_factory=list)
    recipe: Optional[Dict[str, Any]] = None
    evaluation: Optional[Dict[str, Any]] = None
    targets: Dict[str, float] = field(default_factory=dict)
    results: Dict[str, Any] = field(default_factory=dict)

    @property
    def zoo_path(self) -> str:
        """What users pass to -mf / --init-model."""
        return f"zoo:{ZOO_PREFIX}/{self.name}/model"

    @property
    def source(self) -> str:
        if self.files:
            return "download"
        return "built on first use" if self.recipe.get("build_on_use") else "recipe"


def read_card(path: str) -> Card:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ZooError(f"{path}: a model card starts with a YAML front matter between '---' lines.")
    head, body = text[4:].split("\n---\n", 1)
    try:
        data = yaml.safe_load(head) or {}
    except yaml.YAMLError as e:
        raise ZooError(f"{path}: its front matter is not valid YAML ({e}).") from e
    missing = [key for key in REQUIRED if key not in data]
    if missing or not (data.get("files") or data.get("recipe")):
        missing += [] if data.get("files") or data.get("recipe") else ["files or recipe"]
        raise ZooError(f"{path}: the card's front matter lacks {', '.join(missing)}.")
    if data["name"] != os.path.splitext(os.path.basename(path))[0]:
        raise ZooError(f"{path}: its name '{data['name']}' must match the file name.")
    known = Card.__dataclass_fields__
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ZooError(f"{path}: unknown front matter keys {unknown}; a card has {sorted(known)}.")
    keep = (data.get("recipe") or {}).get("keep", "best")
    if keep not in KEEP_RULES:
        raise ZooError(f"{path}: recipe keep '{keep}' is none of {', '.join(KEEP_RULES)}.")
    return Card(path=path, body=body, **data)


def card_paths() -> List[str]:
    paths = sorted(glob.glob(os.path.join(CARDS_DIR, "*.md")))
    extra = os.environ.get(EXTRA_CARDS_ENV)
    if extra:
        paths += sorted(glob.glob(os.path.join(extra, "*.md")))
    return paths


def entries() -> Dict[str, Card]:
    cards: Dict[str, Card] = {}
    for path in card_paths():
        card = read_card(path)
        if card.name in cards:
            raise ZooError(f"{path}: entry '{card.name}' is already defined by {cards[card.name].path}.")
        cards[card.name] = card
    return cards


def get(name: str) -> Card:
    cards = entries()
    if name not in cards:
        raise ZooError(
            f"zoo:{ZOO_PREFIX}/{name}: no such entry. Entries: {', '.join(sorted(cards))} "
            f"(python -m parlai_poly.zoo list)."
        )
    return cards[name]


def install_dir(datapath: str, name: str) -> str:
    """Where ParlAI looks for zoo:parlai_poly/<name>/...: <datapath>/models/parlai_poly/<name>."""
    return os.path.join(datapath, "models", ZOO_PREFIX, name)


def write_results(card: Card, results: Dict[str, Any]) -> None:
    """Record measured results in the card's front matter (maintainers, after a build)."""
    from parlai_poly.storage import atomic_write_text

    with open(card.path, encoding="utf-8") as f:
        head, body = f.read()[4:].split("\n---\n", 1)
    data = yaml.safe_load(head)
    data["results"] = results
    front = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
    atomic_write_text(card.path, f"---\n{front}---\n{body}")
