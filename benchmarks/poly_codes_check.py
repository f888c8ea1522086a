"""How far a poly-encoder's codes are from the backbone's mean pooling (README, "Model zoo").

    python -m benchmarks.poly_codes_check data/models/parlai_poly/ccc_poly16/model [MODEL ...]

For each model file: the codes' standard deviation (they start at 0.02), and over a few contexts
the entropy of each code's attention over the tokens as a share of the uniform one (1.0: every
code takes the plain mean) and the lowest cosine between a context vector and the mean-pooled
context. Codes that attend uniformly make the poly-encoder score as a bi-encoder.
"""
import math
import sys

import torch

CONTEXTS = [
    "hi how are you doing today? i am fine thanks, just got back from the gym",
    "what is your favorite movie and why do you like it so much",
    "i love to cook italian food, especially pasta with fresh tomatoes",
]


@torch.no_grad()
def check(model_file: str) -> None:
    from parlai_poly.loading import load_agent

    agent = load_agent(model_file, {"datatype": "valid"}, kinds=("poly",))
    model = agent.model
    codes = model.codes  # [m, d]
    entropies, cosines = [], []
    for text in CONTEXTS:
        hidden, mask = model.context_encoder(torch.tensor([agent.dict.txt2vec(text)]))  # [1, T, d], [1, T]
        weights = torch.softmax(model.codes_attention.logits(codes.unsqueeze(0), hidden, mask), -1)[0]  # [m, T]
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1) / math.log(weights.size(-1))  # [m]
        vectors = weights @ hidden[0]  # [m, d]
        mean = hidden[0][mask[0]].mean(0)  # [d]
        entropies.append(entropy.mean().item())
        cosines.append(torch.cosine_similarity(vectors, mean[None], dim=-1).min().item())
    print(
        f"{model_file}: codes std {codes.std().item():.4f}; attention entropy / uniform "
        f"{min(entropies):.4f}-{max(entropies):.4f}; lowest cosine with mean pooling {min(cosines):.4f}"
    )


if __name__ == "__main__":
    for path in sys.argv[1:]:
        check(path)
