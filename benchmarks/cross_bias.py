"""How far a cross-encoder's attention across the pair has opened: its learned biases.

    python benchmarks/cross_bias.py data/models/parlai_poly/ccc_cross/model

With ``--cross-segment-attention-bias``, each attention head adds a learned bias to the logits
between a context token and a candidate token (-8 at the start: a token gives the other text
about e^-8 of the weight it gives its own). This prints the biases of a model file (or of a
build's checkpoint) in logit units, without loading the model.
"""
import os
import sys

from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from parlai_poly.modules.cross_encoder import SEGMENT_BIAS_UNIT  # noqa: E402


def main(path: str) -> None:
    with safe_open(path, "pt") as weights:
        keys = [key for key in weights.keys() if key.endswith("segment_bias")]
        if not keys:
            raise SystemExit(f"{path}: no segment_bias weights (not trained with --cross-segment-attention-bias)")
        for key in keys:
            bias = weights.get_tensor(key).float() * SEGMENT_BIAS_UNIT
            print(f"{key}: {bias.numel()} heads, min {bias.min():.2f}, mean {bias.mean():.2f}, max {bias.max():.2f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
