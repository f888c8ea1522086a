"""The peer a user would pick instead: sentence-transformers on the same CCC data and CPU minutes.

    python benchmarks/st_peer.py train bi --minutes 55 --out runs/peer/st_bi
    python benchmarks/st_peer.py train cross --minutes 90 --out runs/peer/st_cross
    python benchmarks/st_peer.py evaluate runs/peer/st_bi --sample 2000 --out runs/peer/eval
    python -m parlai_poly.evaluate zoo:parlai_poly/ccc_bi/model runs/peer/eval/st_bi.jsonl \\
        -t parlai_poly.tasks.ccc -dt test -dp data -- --ccc-eval-sample 2000

``train bi``: all-MiniLM-L6-v2 (the same weights as our backbone) fine-tuned by
sentence-transformers' own trainer with ``MultipleNegativesRankingLoss`` (the other responses
of a batch of 64 as negatives, no duplicates in a batch), AdamW at 5e-5 after 100 warm-up
steps, bfloat16 autocast where this CPU's bfloat16 products are timed faster than float32's,
as our ``--precision auto`` decides it, float32 (the library's default) elsewhere
(``--precision bf16|fp32`` to choose). ``train cross``: its
``CrossEncoder`` from the same weights (a new one-logit head), trained with its own
``MultipleNegativesRankingLoss`` for cross-encoders (batches of 8 without duplicates, each
context against its response and 7 others of the batch: the 64 pairs per update our
``ccc_cross`` sees), lr 5e-5, the library's default.
Both read the CCC train examples our teacher gives (every turn after the first, its whole
history as the context), shuffled, contexts cut to their last 64 word pieces as our recipes
cut them (the bi-encoder's one ``max_seq_length`` cuts responses at 64 too, as ``ccc_bi``'s
recipe does; the cross-encoder's pairs at 128, ``ccc_cross``'s 64 + 64); training stops after
``--minutes`` of training or one epoch (``--max-steps`` updates if given: the learning rate's
schedule ends there), whichever comes first (resumable: rerun the same command, the minutes
already spent count).
Minutes are CPU minutes over the thread count, so a run that shares the cores is budgeted
what it got, not the wall clock.

``evaluate`` scores the test examples our teacher draws with ``--ccc-eval-sample N
--ccc-eval-seed S`` (the same examples, in the same order, as ``python -m
parlai_poly.evaluate ... -- --ccc-eval-sample N`` sees) and writes the per-example values
``parlai_poly.evaluate`` pairs with any of our models' (ranks by ``parlai_poly.ranking``);
``--sample 0`` scores the whole test split, in the order of ``parlai_poly.evaluate``'s batched
eval loop (``--eval-batchsize``, its ``-bs``), to pair with our models' whole-test values.
Needs the ``peer`` extra (datasets, accelerate: the trainer's own dependencies).
"""
import argparse
import glob
import json
import os
import random
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/scoring_speed.py
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from parlai_poly import ranking  # noqa: E402
from parlai_poly.backbone import resolve_backbone_path  # noqa: E402
from parlai_poly.storage import atomic_write_text  # noqa: E402

CONTEXT_TOKENS, RESPONSE_TOKENS = 64, 64  # ccc_cross's --text-truncate and --label-truncate
SETTINGS = {
    "bi": dict(batch_size=64, learning_rate=5e-5, warmup_steps=100),
    # the library's default rate (its loss's own example trains with default arguments): at
    # ccc_cross's 1e-5 the new head left its loss at chance, ln 8, for 240 updates
    "cross": dict(batch_size=8, learning_rate=5e-5, warmup_steps=100),
}
BUDGET_FILE = "minutes_spent.json"  # training minutes of earlier runs into the same --out
TRAINED_FILE = "trained.json"  # what was trained: kind, updates, examples, minutes


def ccc_examples(datapath: str, datatype: str, extra=()):
    """The CCC teacher's examples as acts (text = the whole history when sampled)."""
    from parlai.core.params import ParlaiParser
    from parlai.core.teachers import create_task_agent_from_taskname

    from parlai_poly import compat

    compat.apply()
    args = ["-t", "parlai_poly.tasks.ccc", "-dt", datatype, "-dp", datapath, "-m", "parlai_poly.agents:bi", *extra]
    teacher = create_task_agent_from_taskname(ParlaiParser(True, True).parse_args(args))[0]
    return [teacher.act() for _ in range(teacher.num_examples())]


def train_pairs(datapath: str, seed: int):
    """(context, response) of every CCC train example, shuffled; contexts as the agents see
    them: the whole history, turns joined by newlines."""
    from parlai_poly.tasks.ccc.agents import full_context_examples
    from parlai_poly.tasks.ccc.build import read_conversations

    pairs = [
        (example["text"], example["labels"][0])
        for conversation in read_conversations(datapath, "train")
        for example in full_context_examples(conversation["turns"])
    ]
    random.Random(seed).shuffle(pairs)
    return pairs


def cpu_seconds() -> float:
    """This process's CPU time over torch's thread count: what --minutes budgets, so work that
    shares the machine meanwhile (another training, a test run) takes nothing from a peer's
    budget. About the wall time alone while its threads are busy; serial stretches (data
    loading) count a fraction of their wall time, which leaves the peer more, not less."""
    return time.process_time() / torch.get_num_threads()


class StopAfterMinutes:
    """A trainer callback: stop once this run plus earlier runs trained ``minutes`` (CPU
    minutes, ``cpu_seconds``)."""

    def __init__(self, minutes: float, out: str):
        from transformers import TrainerCallback

        self.limit, self.path = minutes * 60, os.path.join(out, BUDGET_FILE)
        self.earlier = json.load(open(self.path))["seconds"] if os.path.isfile(self.path) else 0.0
        self.started = cpu_seconds()
        callback = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                callback.started = cpu_seconds()  # the minutes are training's, not loading's

            def on_step_end(self, args, state, control, **kwargs):
                if callback.spent() >= callback.limit:
                    control.should_training_stop = control.should_save = True

            def on_save(self, args, state, control, **kwargs):
                callback.record(state.global_step)

        self.callback = Callback()

    def spent(self) -> float:
        return self.earlier + cpu_seconds() - self.started

    def record(self, step: int) -> None:
        atomic_write_text(self.path, json.dumps({"seconds": round(self.spent(), 1), "step": step}) + "\n")


def uses_bf16(setting: str) -> bool:
    """--precision decided as our agents decide it (auto: bfloat16 where its products are
    faster); the peer runs it as its library does, under autocast."""
    from parlai_poly import precision

    return precision.resolve(setting, use_cuda=False) in ("bf16", "bf16-full")


def train(kind: str, args) -> None:
    from datasets import Dataset

    settings = SETTINGS[kind]
    pairs = train_pairs(args.datapath, args.seed)
    data = Dataset.from_dict({"anchor": [c for c, _ in pairs], "positive": [r for _, r in pairs]})
    budget = StopAfterMinutes(args.minutes, args.out)
    common = dict(
        output_dir=args.out, num_train_epochs=1, per_device_train_batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"], warmup_steps=settings["warmup_steps"], bf16=uses_bf16(args.precision),
        use_cpu=True, seed=args.seed, save_strategy="steps", save_steps=200, save_total_limit=1,
        logging_steps=50, report_to="none", dataloader_drop_last=True,
    )
    if args.max_steps:  # the learning rate's schedule ends there, not at the epoch's end
        common["max_steps"] = args.max_steps
    trainer = (bi_trainer if kind == "bi" else cross_trainer)(data, common, budget)
    resume = bool(glob.glob(os.path.join(args.out, "checkpoint-*")))
    trainer.train(resume_from_checkpoint=resume or None)
    budget.record(trainer.state.global_step)
    trainer.model.save_pretrained(os.path.join(args.out, "final")) if kind == "cross" else trainer.model.save(os.path.join(args.out, "final"))
    seen = trainer.state.global_step * settings["batch_size"]
    trained = {"kind": kind, "updates": trainer.state.global_step, "examples_seen": seen, "minutes": round(budget.spent() / 60, 1)}
    atomic_write_text(os.path.join(args.out, TRAINED_FILE), json.dumps(trained) + "\n")
    print(json.dumps(trained))


def bi_trainer(data, common, budget):
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    model = SentenceTransformer(resolve_backbone_path(None), device="cpu")
    model.max_seq_length = CONTEXT_TOKENS
    model.tokenizer.truncation_side = "left"  # a context's last turns, as our agents keep them
    arguments = SentenceTransformerTrainingArguments(batch_sampler=BatchSamplers.NO_DUPLICATES, **common)
    loss = MultipleNegativesRankingLoss(model)
    return SentenceTransformerTrainer(model=model, args=arguments, train_dataset=data, loss=loss, callbacks=[budget.callback])


def cross_trainer(data, common, budget):
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    model = CrossEncoder(resolve_backbone_path(None), num_labels=1, max_length=CONTEXT_TOKENS + RESPONSE_TOKENS, device="cpu")
    model.tokenizer.truncation_side = "left"  # the pair's context loses its start first
    arguments = CrossEncoderTrainingArguments(batch_sampler=BatchSamplers.NO_DUPLICATES, **common)
    loss = MultipleNegativesRankingLoss(model, num_negatives=SETTINGS["cross"]["batch_size"] - 1)
    return CrossEncoderTrainer(model=model, args=arguments, train_dataset=data, loss=loss, callbacks=[budget.callback])


def scores_of(kind: str, model_dir: str, examples):
    """[n, 20] scores of each example's candidates by the ``kind`` model in ``model_dir``."""
    if kind == "bi":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_dir, device="cpu")
        model.tokenizer.truncation_side = "left"
        contexts = model.encode([e["text"] for e in examples], convert_to_tensor=True, batch_size=64)
        cands = [c for e in examples for c in e["label_candidates"]]
        encoded = model.encode(cands, convert_to_tensor=True, batch_size=256).view(len(examples), -1, contexts.size(-1))
        # the model's similarity (cosine for MiniLM) of each context with its own candidates
        return torch.stack([model.similarity(c[None], e)[0] for c, e in zip(contexts, encoded)])
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(model_dir, device="cpu")
    model.tokenizer.truncation_side = "left"
    pairs = [(e["text"], c) for e in examples for c in e["label_candidates"]]
    return torch.as_tensor(model.predict(pairs, batch_size=64, show_progress_bar=True)).view(len(examples), -1)


def eval_loop_order(examples, batchsize: int):
    """``examples`` (every example of a split, each with its whole history, conversation by
    conversation, turn by turn) in the order ``parlai_poly.evaluate -bs batchsize`` meets them
    on the whole split, so that the values pair with our models' whole-split values.

    ParlAI's batched eval gives each of ``batchsize`` slots one episode to read to its end, then
    the next unread one; a conversation's two episodes are its answers to the first speaker
    (turns 1, 3, ...) and to the second (turns 2, 4, ...), as ``perspective_episodes`` makes them.
    """
    by_conversation = {}
    for example in examples:
        by_conversation.setdefault(example["conversation_id"], []).append(example)
    episodes = [answers[first::2] for answers in by_conversation.values() for first in (0, 1) if answers[first::2]]
    pending, ordered = iter(episodes), []
    slots = [next(pending, None) for _ in range(batchsize)]
    while any(slots):
        for slot, episode in enumerate(slots):
            if episode:
                ordered.append(episode.pop(0))
                slots[slot] = episode or next(pending, None)
    return ordered


def evaluate(args) -> None:
    if args.sample:
        sample = ["--ccc-eval-sample", str(args.sample), "--ccc-eval-seed", str(args.sample_seed)]
        examples = ccc_examples(args.datapath, "test", sample)
    else:  # every example, drawn as a sample of all of them so that each carries its whole history
        examples = eval_loop_order(ccc_examples(args.datapath, "test", ["--ccc-eval-sample", str(10**9)]), args.eval_batchsize)
    with open(os.path.join(args.model, TRAINED_FILE), encoding="utf-8") as f:
        trained = json.load(f)
    kind = trained["kind"]
    scores = scores_of(kind, os.path.join(args.model, "final"), examples).float()
    labels = torch.tensor([e["label_candidates"].index(e["eval_labels"][0]) for e in examples])
    metrics = ranking.rank_metrics(scores, labels, ks=(1, 5))
    n = scores.size(1)
    rows = [
        {"conversation": e["conversation_id"], "mrr": float(metrics["mrr"][i]),
         f"R@1/{n}": float(metrics["R@1"][i]), f"R@5/{n}": float(metrics["R@5"][i])}
        for i, e in enumerate(examples)
    ]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, os.path.basename(os.path.normpath(args.model)) + ".jsonl")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    # what the training cost, beside the values (benchmarks/zoo_table.py reads it)
    atomic_write_text(path[: -len(".jsonl")] + ".trained.json", json.dumps(trained) + "\n")
    print(f"{path}: R@1/{n} {sum(r[f'R@1/{n}'] for r in rows) / len(rows):.4f} over {len(rows)} examples")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("train")
    fit.add_argument("kind", choices=sorted(SETTINGS))
    fit.add_argument("--minutes", type=float, required=True, help="training minutes, all runs into --out together")
    fit.add_argument("--out", required=True)
    fit.add_argument("--seed", type=int, default=1)
    fit.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    fit.add_argument(
        "--max-steps", type=int, default=None,
        help="updates to train, the linear schedule decaying to 0 at the last (default: one epoch); "
        "to give the peer a schedule that ends within --minutes",
    )
    score = sub.add_parser("evaluate")
    score.add_argument("model", help="a train --out folder")
    score.add_argument("--sample", type=int, default=2000, help="test examples drawn over all conversations; 0: all")
    score.add_argument(
        "--eval-batchsize", type=int, default=32,
        help="with --sample 0: the -bs of the parlai_poly.evaluate run whose whole-split values these pair with",
    )
    score.add_argument("--sample-seed", type=int, default=0)
    score.add_argument("--out", required=True)
    for p in (fit, score):
        p.add_argument("--datapath", default="data")
    args = parser.parse_args(argv)
    train(args.kind, args) if args.command == "train" else evaluate(args)


if __name__ == "__main__":
    main()
