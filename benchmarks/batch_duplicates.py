"""How often a CCC train example meets a copy of its own label among its batch's negatives.

    python benchmarks/batch_duplicates.py [--datapath data] [--batchsize 64]

With batch negatives a copy of the label elsewhere in the batch is scored as a wrong answer.
Compares shuffled batches with ParlAI's ``--dynamic-batching batchsort``, simulated as its
DynamicBatchWorld builds batches: a buffer of 1,021 examples sorted by the word-piece lengths
of context and label (cut at 64, rounded up to 8), each batch grown from a random position
towards shorter examples within a budget of batchsize x 128 tokens. Labels are compared
lower-cased, whitespace collapsed. Prints the share of examples whose label recurs in their
batch, for each way.
"""
import argparse
import os
import random
from collections import Counter
from typing import List, Sequence, Tuple

from tokenizers import Tokenizer

from parlai_poly.backbone import resolve_backbone_path
from parlai_poly.tasks.ccc.agents import full_context_examples
from parlai_poly.tasks.ccc.build import read_conversations

TRUNCATE = 64  # the recipes' --text-truncate and --label-truncate
BUFFER = 1021  # DynamicBatchWorld's buffer of examples
PAD_MULTIPLE = 8  # DynamicBatchWorld rounds lengths up to this


def bucketed_lengths(texts: Sequence[str]) -> List[int]:
    """Word pieces of each text, cut at TRUNCATE and rounded up to PAD_MULTIPLE."""
    tokenizer = Tokenizer.from_file(os.path.join(resolve_backbone_path(None), "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=TRUNCATE)
    # a context's last 600 characters hold more than TRUNCATE word pieces: enough to measure
    lengths = (len(tokenizer.encode(text[-600:]).ids) for text in texts)
    return [-(-n // PAD_MULTIPLE) * PAD_MULTIPLE for n in lengths]


def batchsort_batches(
    order: List[int], lengths: List[Tuple[int, int]], batchsize: int, rng: random.Random
) -> List[List[int]]:
    """Batches of the example indices in ``order`` as DynamicBatchWorld forms them from their
    (context, label) ``lengths``: sorted by them, a batch's width their sum."""
    stream, buffer, batches = iter(order), [], []
    width_of = lambda i: sum(lengths[i])  # noqa: E731
    while True:
        buffer.extend(index for _, index in zip(range(BUFFER - len(buffer)), stream))
        if not buffer:
            return batches
        buffer.sort(key=lambda i: lengths[i] + (rng.random(),))
        position, width, batch = rng.randrange(len(buffer)), 0, []
        while position < len(buffer) - 1 and width_of(buffer[position]) == width_of(buffer[position + 1]):
            position += 1  # the last of its width: the batch grows towards shorter ones
        while buffer and len(batch) < batchsize:
            new_width = max(width, width_of(buffer[position]))
            if new_width * (len(batch) + 1) > 2 * TRUNCATE * batchsize:
                break
            width = new_width
            batch.append(buffer.pop(position))
            position = max(position - 1, 0)
        batches.append(batch)


def share_with_own_label(batches: List[List[int]], labels: List[str]) -> float:
    """The share of examples whose label appears more than once in their batch."""
    repeated = sum(count for batch in batches for count in Counter(labels[i] for i in batch).values() if count > 1)
    return repeated / sum(len(batch) for batch in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datapath", default="data")
    parser.add_argument("--batchsize", type=int, default=64)
    args = parser.parse_args()
    pairs = [
        (example["text"], example["labels"][0])
        for conversation in read_conversations(args.datapath, "train")
        for example in full_context_examples(conversation["turns"])
    ]
    labels = [" ".join(label.lower().split()) for _, label in pairs]
    context_lengths, label_lengths = bucketed_lengths([c for c, _ in pairs]), bucketed_lengths([r for _, r in pairs])
    rng = random.Random(0)
    order = rng.sample(range(len(pairs)), len(pairs))
    shuffled = [order[i : i + args.batchsize] for i in range(0, len(order), args.batchsize)]
    sorted_batches = batchsort_batches(order, list(zip(context_lengths, label_lengths)), args.batchsize, rng)
    print(f"{len(pairs):,} train examples, {len(set(labels)):,} distinct labels")
    short = sum(n <= PAD_MULTIPLE for n in label_lengths) / len(pairs)
    cut = sum(n == TRUNCATE for n in context_lengths) / len(pairs)
    print(f"labels of at most {PAD_MULTIPLE} word pieces: {short:.3f}; contexts cut at {TRUNCATE}: {cut:.3f}")
    for name, batches in (("shuffled", shuffled), ("batchsort", sorted_batches)):
        share = share_with_own_label(batches, labels)
        print(f"{name}: {len(batches):,} batches, examples whose label recurs in their batch {share:.4f}")


if __name__ == "__main__":
    main()
