"""ParlAI teachers for CCC: ``-t parlai_poly.tasks.ccc`` with ``-dt train``, ``valid`` or ``test``.

Each conversation of turns t0, t1, t2, ... becomes two episodes, one per speaker, the way
ParlAI's ConvAI2 ``both`` teachers present a dialogue from each side:

- answering as the second speaker: t0 -> t1, t2 -> t3, t4 -> t5, ...
- answering as the first speaker: "t0\\nt1" -> t2, t3 -> t4, t5 -> t6, ...

ParlAI's agents add each example's label to their history, so after the k-th example the
history holds every turn so far, joined by newlines, and every (context, next turn) pair of the
conversation is an example exactly once. Valid and test examples carry 20 fixed
``label_candidates``; train examples carry none (ranking models use the other labels of the
batch as negatives) unless ``--ccc-train-candidates true``, or ``--ccc-hard-negatives-model``
gives them a bi-encoder's hard negatives (``hard_negatives.py``).
"""
import copy
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from parlai.core.opt import Opt
from parlai.core.params import ParlaiParser
from parlai.core.teachers import DialogTeacher
from parlai.utils.data import DatatypeHelper

from parlai_poly.errors import ParlaiPolyError

from . import build as ccc_build
from . import hard_negatives

Example = Dict[str, object]


def perspective_episodes(
    turns: Sequence[str], label_candidates: Optional[Sequence[Sequence[str]]] = None
) -> List[List[Example]]:
    """The (up to) two episodes of one conversation, one per answering speaker.

    ``label_candidates[i]``, when given, are the candidates for turn ``i + 1``. A trailing turn
    that nobody answers is not an example: it would have no label.
    """
    episodes = []
    for first_label in (1, 2):  # the second speaker answers t1, t3, ...; the first t2, t4, ...
        episode = []
        for label_index in range(first_label, len(turns), 2):
            # The first example of an episode carries everything before its label; later ones
            # only the partner's new turn, the rest being in the agent's history already.
            context = turns[:label_index] if label_index == first_label else [turns[label_index - 1]]
            example: Example = {"text": "\n".join(context), "labels": [turns[label_index]]}
            if label_candidates is not None:
                example["label_candidates"] = list(label_candidates[label_index - 1])
            episode.append(example)
        if episode:
            episodes.append(episode)
    return episodes


class CccTeacher(DialogTeacher):
    """Both speakers' sides of every CCC conversation of the chosen split."""

    @classmethod
    def add_cmdline_args(
        cls, parser: ParlaiParser, partial_opt: Optional[Opt] = None
    ) -> ParlaiParser:
        super().add_cmdline_args(parser, partial_opt)
        group = parser.add_argument_group("CCC teacher arguments")
        group.add_argument(
            "--ccc-train-candidates",
            type="bool",
            default=False,
            help="also give train examples 20 seeded label_candidates (valid and test always "
            "have them); for models that cannot use batch negatives, such as a cross-encoder",
        )
        group.add_argument(
            "--ccc-hard-negatives-model",
            default=None,
            help="train on a sample of conversations whose examples carry 16 label_candidates: "
            "the label, 7 responses that this bi-encoder model file ranks highest each among 19 "
            "random ones, and 8 random ones (mined once into the datapath); train with "
            "--candidates inline",
        )
        group.add_argument(
            "--ccc-hard-negatives-conversations",
            type=int,
            default=400,
            help="how many train conversations --ccc-hard-negatives-model mines and trains on",
        )
        return parser

    def __init__(self, opt: Opt, shared=None):
        opt = copy.deepcopy(opt)
        self.fold = DatatypeHelper.fold(opt["datatype"])
        if not shared:  # a shared copy reuses the data its parent loaded
            ccc_build.build(opt["datapath"])
        opt["datafile"] = ccc_build.processed_path(opt["datapath"], self.fold)
        if self.fold == "train" and opt.get("ccc_hard_negatives_model"):
            if opt.get("ccc_train_candidates"):
                raise ParlaiPolyError(
                    "--ccc-train-candidates and --ccc-hard-negatives-model both give train "
                    "examples candidates: choose one."
                )
            if not shared:
                model, conversations = opt["ccc_hard_negatives_model"], opt["ccc_hard_negatives_conversations"]
                opt["datafile"] = hard_negatives.build(opt["datapath"], model, conversations)
        self.id = "ccc"
        super().__init__(opt, shared)

    def setup_data(self, datafile: str) -> Iterator[Tuple[Example, bool]]:
        conversations = self._conversations_with_candidates(datafile)
        for turns, candidates in conversations:
            for episode in perspective_episodes(turns, candidates):
                for index, example in enumerate(episode):
                    yield example, index == 0

    def _conversations_with_candidates(
        self, datafile: str
    ) -> Iterator[Tuple[List[str], Optional[List[List[str]]]]]:
        """(turns, candidates or None) per conversation; train candidates are drawn on demand.

        Drawing them here rather than storing them keeps train.jsonl small for the usual case
        of batch negatives; they come out of the same seeded function as valid and test's.
        """
        records = list(ccc_build.read_jsonl(datafile))
        if self.fold == "train" and self.opt.get("ccc_train_candidates"):
            conversations = [(record["id"], record["turns"]) for record in records]
            for record, candidates in zip(records, ccc_build.label_candidates_for(conversations)):
                record["label_candidates"] = candidates
        for record in records:
            yield record["turns"], record.get("label_candidates")


class DefaultTeacher(CccTeacher):
    pass
