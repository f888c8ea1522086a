"""ParlAI teachers for CCC: ``-t parlai_poly.tasks.ccc`` with ``-dt train``, ``valid`` or ``test``.

Each conversation of turns t0, t1, t2, ... becomes two episodes, one per speaker, the way
ParlAI's ConvAI2 ``both`` teachers present a dialogue from each side:

- answering as the second speaker: t0 -> t1, t2 -> t3, t4 -> t5, ...
- answering as the first speaker: "t0\\nt1" -> t2, t3 -> t4, t5 -> t6, ...

ParlAI's agents add each example's label to their history, so after the k-th example the
history holds every turn so far, joined by newlines, and every (context, next turn) pair of the
conversation is an example exactly once. Every example names its conversation
(``conversation_id``), for confidence intervals that resample conversations
(``parlai_poly.evaluate``). Valid and test examples carry 20 fixed
``label_candidates``; train examples carry none (ranking models use the other labels of the
batch as negatives) unless ``--ccc-train-candidates true``, or ``--ccc-hard-negatives-model``
gives them a bi-encoder's hard negatives (``hard_negatives.py``).

``--ccc-eval-sample N`` evaluates on N examples drawn (``--ccc-eval-seed``) from the whole
valid or test split, so they spread over all its conversations instead of the few that the
split's first N examples come from; each is an episode of its own whose text is its full
history, the same context the whole-split episodes build up turn by turn.

Training reads every episode once per pass, each pass in a new random order
(``--ccc-train-order shuffled``). ParlAI's own teachers draw each episode at random with
replacement, so that "one epoch" of CCC train saw about 63% of its distinct examples, some
several times: ``--ccc-train-order parlai`` keeps that.
"""
import copy
import json
import os
import random
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


def full_context_examples(
    turns: Sequence[str], label_candidates: Optional[Sequence[Sequence[str]]] = None
) -> List[Example]:
    """Every example of one conversation as its own episode: the text is the whole history
    before the label, as ``perspective_episodes``' episodes build it in an agent's history."""
    examples = []
    for label_index in range(1, len(turns)):
        example: Example = {"text": "\n".join(turns[:label_index]), "labels": [turns[label_index]]}
        if label_candidates is not None:
            example["label_candidates"] = list(label_candidates[label_index - 1])
        examples.append(example)
    return examples


def sample_examples(conversations, size: int, seed: int) -> Iterator[Example]:
    """``size`` examples drawn without replacement from all of ``conversations``
    [(id, turns, candidates)], in the split's order, each naming its conversation."""
    everything = [
        (conversation_id, example)
        for conversation_id, turns, candidates in conversations
        for example in full_context_examples(turns, candidates)
    ]
    chosen = sorted(random.Random(seed).sample(range(len(everything)), min(size, len(everything))))
    for index in chosen:
        conversation_id, example = everything[index]
        yield dict(example, conversation_id=conversation_id)


TRAIN_ORDERS = ("shuffled", "parlai")


def epochs_trained(opt: Opt) -> float:
    """How many epochs ParlAI's train loop has already trained --model-file for, as it restores
    them on resuming (examples read / examples in the train set): from
    ``MODEL.checkpoint.trainstats`` when it resumes from ``MODEL.checkpoint``, else from
    ``MODEL.trainstats``; 0 for a new training."""
    model_file = opt.get("model_file")
    if not model_file:
        return 0.0
    checkpoint = opt.get("load_from_checkpoint") and os.path.exists(model_file + ".checkpoint")
    path = model_file + (".checkpoint.trainstats" if checkpoint else ".trainstats")
    if not os.path.exists(path):
        return 0.0
    with open(path) as stats:
        return float(json.load(stats).get("total_epochs", 0.0))


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
            "--ccc-eval-sample",
            type=int,
            default=0,
            help="valid/test: evaluate on this many examples drawn from the whole split (spread "
            "over all its conversations, each with its full history) instead of every example; "
            "0: every example",
        )
        group.add_argument("--ccc-eval-seed", type=int, default=0, help="seed of --ccc-eval-sample")
        group.add_argument(
            "--ccc-train-order",
            default="shuffled",
            choices=TRAIN_ORDERS,
            help="training: shuffled, every episode once per pass over the data, each pass in a "
            "new random order (what sentence-transformers' samplers do); parlai, ParlAI's own "
            "draw of each episode at random with replacement, so that one epoch sees about 63%% "
            "of the distinct examples",
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

    def next_episode_idx(self, num_eps=None, loop=None):
        """Training with ``--ccc-train-order shuffled``: the next episode of a random order of
        all of them, a new order each pass. The position lives on ``self.index``, which every
        copy of the teacher (one per batch row) shares, so together they read each episode
        once per pass; a training resumed from its checkpoint starts where it stopped."""
        if not self.random or self.opt.get("ccc_train_order") == "parlai":
            return super().next_episode_idx(num_eps, loop)
        position = self.index
        if position.get("order") is None:
            position.passes, position.value = self._resume_position()
            position.order = self._pass_order(position.passes)
        position.value += 1
        if position.value >= len(position.order):
            position.passes, position.value = position.passes + 1, 0
            position.order = self._pass_order(position.passes)
        return position.order[position.value]

    def _pass_order(self, passes: int) -> List[int]:
        """The episodes' order in pass ``passes`` (0-based): a function of --seed and the pass
        alone, so that a resumed training can find its place again."""
        seed, episodes = self.opt.get("seed") or 0, self.num_episodes()
        return random.Random(f"ccc train order {seed} {passes}").sample(range(episodes), episodes)

    def _resume_position(self) -> Tuple[int, int]:
        """(pass, index of the last episode read) for the examples a resumed training has seen,
        as ParlAI's train loop counts them in its trainstats (a checkpoint's when it resumes
        from one); (0, -1) for a new training. Exact to within the episodes in flight at the
        stop (one per batch row, and batchsort's pool), which that pass then skips."""
        seen = round(epochs_trained(self.opt) * self.num_examples())
        passes, remainder = divmod(seen, self.num_examples())
        order, read, index = self._pass_order(passes), 0, -1
        while read < remainder:
            index += 1
            read += len(self.data.data[order[index]])
        return passes, index

    def setup_data(self, datafile: str) -> Iterator[Tuple[Example, bool]]:
        conversations = self._conversations_with_candidates(datafile)
        sample = self.opt.get("ccc_eval_sample") or 0
        if sample < 0:
            raise ParlaiPolyError(f"--ccc-eval-sample {sample}: give a number of examples, or 0 for all.")
        if sample and self.fold != "train":
            for example in sample_examples(conversations, sample, self.opt.get("ccc_eval_seed") or 0):
                yield example, True
            return
        for conversation_id, turns, candidates in conversations:
            for episode in perspective_episodes(turns, candidates):
                for index, example in enumerate(episode):
                    yield dict(example, conversation_id=conversation_id), index == 0

    def _conversations_with_candidates(
        self, datafile: str
    ) -> Iterator[Tuple[str, List[str], Optional[List[List[str]]]]]:
        """(id, turns, candidates or None) per conversation; train candidates are drawn on demand.

        Drawing them here rather than storing them keeps train.jsonl small for the usual case
        of batch negatives; they come out of the same seeded function as valid and test's.
        """
        records = list(ccc_build.read_jsonl(datafile))
        if self.fold == "train" and self.opt.get("ccc_train_candidates"):
            conversations = [(record["id"], record["turns"]) for record in records]
            for record, candidates in zip(records, ccc_build.label_candidates_for(conversations)):
                record["label_candidates"] = candidates
        for record in records:
            yield record["id"], record["turns"], record.get("label_candidates")


class DefaultTeacher(CccTeacher):
    pass
