"""Model modules on plain tensors: reductions, poly-encoder scoring, cross-encoder pairs."""
import math

import pytest
import torch

from parlai_poly.modules import Attention, CrossEncoderModule, Pooling, PolyEncoderModule, TextEncoder


class FakeEncoder(torch.nn.Module):
    """Stands in for TextEncoder: embeds ids, so module maths can be checked by hand."""

    def __init__(self, dim=8, vocab=50, pad_idx=0):
        super().__init__()
        self.dim, self.pad_idx = dim, pad_idx
        self.emb = torch.nn.Embedding(vocab, dim)

    def forward(self, ids, segments=None):
        return self.emb(ids), ids != self.pad_idx


def test_pooling_reductions_respect_the_mask():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # [1, 3, 2]
    mask = torch.tensor([[True, True, False]])
    assert Pooling("first")(hidden, mask).tolist() == [[1.0, 2.0]]
    assert Pooling("mean")(hidden, mask).tolist() == [[2.0, 3.0]]
    assert Pooling("max")(hidden, mask).tolist() == [[3.0, 4.0]]
    assert Pooling("mean_first_m", first_m=1)(hidden, mask).tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError, match="reduction-type"):
        Pooling("last")


def test_first_and_mean_reductions_equal_transformers_on_minilm():
    """Our encoder + pooling give exactly what transformers gives for all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoTokenizer

    from parlai_poly.backbone import load_encoder, resolve_backbone_path

    path = resolve_backbone_path(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModel.from_pretrained(path).eval()
    texts = ["hello there, how are you?", "fine", "a somewhat longer sentence about dogs and cats"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = reference(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        ref_mean = (ref * mask).sum(1) / mask.sum(1)
        ours = TextEncoder(load_encoder(None).eval(), tokenizer.pad_token_id)
        hidden, our_mask = ours(batch["input_ids"])
    torch.testing.assert_close(Pooling("first")(hidden, our_mask), ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Pooling("mean")(hidden, our_mask), ref_mean, rtol=1e-5, atol=1e-5)


def naive_poly_scores(module, context, context_mask, cands):
    """The paper's formula, one context and one candidate at a time."""
    bsz, n = context.size(0), cands.size(-2)
    out = torch.empty(bsz, n)
    for b in range(bsz):
        for j in range(n):
            cand = cands[j] if cands.dim() == 2 else cands[b, j]
            att = module.poly_attention
            if att.kind == "multihead":
                y, _ = att.mha(cand.view(1, 1, -1), context[b : b + 1], context[b : b + 1], key_padding_mask=~context_mask[b : b + 1])
                y = y.view(-1)
            else:
                logits = (context[b] @ cand) * (1 / math.sqrt(cand.numel()) if att.kind == "sqrt" else 1.0)
                w = torch.softmax(logits.masked_fill(~context_mask[b], float("-inf")), dim=0)
                y = w @ context[b]
            out[b, j] = y @ cand
    return out


@pytest.mark.parametrize("attention", ["basic", "sqrt", "multihead"])
@pytest.mark.parametrize("poly_type", ["codes", "n_first"])
def test_poly_scoring_equals_the_naive_formula(attention, poly_type):
    torch.manual_seed(0)
    module = PolyEncoderModule(FakeEncoder(), poly_type=poly_type, n_codes=5, codes_attention=attention, codes_heads=2, poly_attention=attention, poly_heads=2).eval()
    ids = torch.tensor([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]])  # first context shorter than m
    with torch.no_grad():
        context, mask = module.encode_context(ids)
        shared = torch.randn(7, 8)  # [N, d]
        per_example = torch.randn(2, 4, 8)  # [B, N, d]
        for cands in (shared, per_example):
            torch.testing.assert_close(module.score(context, mask, cands), naive_poly_scores(module, context, mask, cands), rtol=1e-5, atol=1e-5)
    assert mask.shape == (2, 5)
    assert mask[0].tolist() == ([True] * 3 + [False] * 2 if poly_type == "n_first" else [True] * 5)


def test_cosine_bi_encoder_scores_scaled_cosines_of_the_pooled_vectors():
    from parlai_poly.modules import BiEncoderModule

    torch.manual_seed(0)
    module = BiEncoderModule(FakeEncoder(), similarity="cosine", similarity_scale=7.0, candidate_mlp=True)
    contexts, cands = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]]), torch.tensor([[8, 9, 0], [10, 0, 0], [11, 12, 13]])
    with torch.no_grad():
        pooled_context = module.pooling(*module.context_encoder(contexts))  # [2, d]
        pooled_cands = module.candidate_mlp(module.pooling(*module.context_encoder(cands)))  # [3, d]
        cosines = torch.nn.functional.cosine_similarity(pooled_context[:, None], pooled_cands[None], dim=-1)
        encoded = module.encode_candidates(cands)
        torch.testing.assert_close(encoded.norm(dim=-1), torch.ones(3))  # cached as unit vectors
        torch.testing.assert_close(module.encode_context(contexts).norm(dim=-1), torch.full((2,), 7.0))
        torch.testing.assert_close(module(contexts, cands), 7.0 * cosines)
        torch.testing.assert_close(module.score(module.encode_context(contexts), encoded), 7.0 * cosines)


@pytest.mark.parametrize("poly_type", ["codes", "n_first"])
def test_cosine_poly_encoder_attends_and_scores_by_scaled_cosines(poly_type):
    """score = s sum_i softmax_i(s cos_i) cos_i, cos_i the cosine of context vector i and the
    candidate: both the attention and the score see cosines times the scale."""
    torch.manual_seed(0)
    scale = 5.0
    module = PolyEncoderModule(FakeEncoder(), poly_type=poly_type, n_codes=4, similarity="cosine", similarity_scale=scale).eval()
    dot_twin = PolyEncoderModule(FakeEncoder(), poly_type=poly_type, n_codes=4)
    dot_twin.load_state_dict(module.state_dict())
    ids, cand_ids = torch.tensor([[1, 2, 0, 0, 0], [3, 4, 5, 6, 7]]), torch.tensor([[8, 9], [10, 0], [11, 12]])
    with torch.no_grad():
        raw, mask = dot_twin.encode_context(ids)  # [2, 4, d]: the vectors before the similarity
        raw_cands = dot_twin.encode_candidates(cand_ids)  # [3, d]
        cos = torch.nn.functional.cosine_similarity(raw[:, :, None], raw_cands[None, None], dim=-1)  # [2, 4, 3]
        weights = torch.softmax((scale * cos).masked_fill(~mask[:, :, None], float("-inf")), dim=1)
        expected = scale * (weights * cos).sum(1)  # [2, 3]
        torch.testing.assert_close(module(ids, cand_ids), expected, rtol=1e-5, atol=1e-5)


def test_codes_attention_basic_is_softmax_weighted_sum():
    torch.manual_seed(0)
    query, memory = torch.randn(1, 2, 4), torch.randn(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    weights = torch.softmax(query[0] @ memory[0, :2].t(), dim=-1)
    torch.testing.assert_close(Attention("basic", 4)(query, memory, mask)[0], weights @ memory[0, :2])


def test_poly_rejects_zero_codes():
    with pytest.raises(ValueError, match="poly-n-codes"):
        PolyEncoderModule(FakeEncoder(), n_codes=0)


def test_cross_pairs_join_context_and_candidate_with_segments():
    context = torch.tensor([[101, 5, 102, 0], [101, 6, 7, 102]])
    cands = torch.tensor([[101, 8, 9, 102], [101, 3, 102, 0]])
    ids, segments = CrossEncoderModule.pair_inputs(context, cands, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), pad_idx=0)
    assert ids.tolist() == [
        [101, 5, 102, 8, 9, 102],
        [101, 5, 102, 3, 102, 0],
        [101, 6, 7, 102, 3, 102],
    ]  # padded only to the longest pair
    assert segments.tolist() == [
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]


def test_cross_segment_cosine_head_is_scaled_cosine_of_segment_means():
    encoder = FakeEncoder(vocab=110)
    module = CrossEncoderModule(encoder, head="segment-cosine")
    context = torch.tensor([[101, 5, 102, 0], [101, 6, 7, 102]])
    cands = torch.tensor([[101, 8, 9, 102], [101, 3, 102, 0]])
    ids, segments = CrossEncoderModule.pair_inputs(context, cands, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), pad_idx=0)
    scores = module(ids, segments)
    emb = encoder.emb.weight.detach()
    by_hand = []
    for ctx_ids, cand_ids in (([101, 5, 102], [8, 9, 102]), ([101, 5, 102], [3, 102]), ([101, 6, 7, 102], [3, 102])):
        cos = torch.nn.functional.cosine_similarity(emb[ctx_ids].mean(0), emb[cand_ids].mean(0), dim=0)
        by_hand.append(20.0 * cos)  # the padding of the second pair counts for nothing
    torch.testing.assert_close(scores.detach(), torch.stack(by_hand), rtol=1e-5, atol=1e-5)
    assert not hasattr(module, "classifier")
    with pytest.raises(ValueError, match="cross-head"):
        CrossEncoderModule(encoder, head="bilinear")


def two_text_pairs():
    context = torch.tensor([[101, 5, 6, 102, 0], [101, 7, 102, 0, 0]])
    cands = torch.tensor([[101, 8, 9, 10, 102], [101, 3, 102, 0, 0]])
    pairs = CrossEncoderModule.pair_inputs(
        context, cands, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), pad_idx=0, keep_candidate_start=True
    )
    texts = [([101, 5, 6, 102], [101, 8, 9, 10, 102]), ([101, 5, 6, 102], [101, 3, 102]), ([101, 7, 102], [101, 3, 102])]
    return pairs, texts


@pytest.mark.parametrize(
    "closed, tolerance, opened",
    [
        ({"head": "segment-cosine", "segment_attention_bias": -1e4}, 1e-4, ("segment_bias", torch.zeros_like)),
        ({"head": "segment-cosine", "segment_gate": 0.0}, 1e-5, ("segment_gate", lambda p: torch.full_like(p, 0.5))),
        # not a constant vector: the reader's output comes out of a layer norm (mean 0 across d)
        ({"head": "reader"}, 1e-5, ("reader_head", lambda p: torch.linspace(-1, 1, p.numel()))),
        ({"head": "residual"}, 1e-5, ("residual_head", lambda p: torch.linspace(-1, 1, p.numel()))),
    ],
    ids=["bias at -inf", "gate at 0", "reader at 0", "residual at 0"],
)
def test_cross_with_closed_attention_across_is_the_bi_encoder(tiny_backbone, closed, tolerance, opened):
    """Closed across the pair (a bias of -inf, a gate of 0, or a reader whose head is 0), each
    text is read alone, as the bi-encoder reads it (own positions, token type 0): the score is
    the cosine of the two texts' mean outputs, in float32 and on the bfloat16 copy alike;
    opened, it reads across."""
    from parlai_poly.backbone import load_encoder

    torch.manual_seed(0)
    encoder = TextEncoder(load_encoder(tiny_backbone), pad_idx=0).eval()
    module = CrossEncoderModule(encoder, **closed)
    (ids, segments), texts = two_text_pairs()
    with torch.no_grad():
        scores = module(ids, segments)
        mean = lambda t: encoder(torch.tensor([t]))[0][0].mean(0)  # noqa: E731
        bi = torch.stack([20.0 * torch.cosine_similarity(mean(c), mean(r), dim=0) for c, r in texts])
        torch.testing.assert_close(scores, bi, rtol=tolerance, atol=tolerance)
        encoder.compute_dtype = torch.bfloat16  # the inference copy runs the same attention
        torch.testing.assert_close(module(ids, segments), bi, rtol=0.05, atol=0.3)
        encoder.compute_dtype = None
        name, value = opened
        getattr(module, name).copy_(value(getattr(module, name)))
        assert not torch.allclose(module(ids, segments), bi, atol=1e-3)


def test_residual_head_trains_the_pair_reader_and_leaves_the_bi_encoder_as_it_was(tiny_backbone):
    """The residual head's prior is a frozen copy of the encoder it starts from, read without
    dropout even in training: a step moves the full-attention encoder and the head, never the
    prior, whose score stays the bi-encoder's."""
    from parlai_poly.backbone import load_encoder

    torch.manual_seed(0)
    module = CrossEncoderModule(TextEncoder(load_encoder(tiny_backbone), pad_idx=0, freeze_embeddings=False), head="residual")
    (ids, segments), _ = two_text_pairs()
    prior = {k: v.clone() for k, v in module.prior_encoder.state_dict().items()}
    with torch.no_grad():
        start = module(ids, segments)
    module.train()
    assert module.encoder.training and not module.prior_encoder.training
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)  # the head is stored / 100: moves 100x
    for _ in range(2):  # the head moves first; the encoder's gradient comes through it after
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(ids, segments)[None], torch.tensor([1])).backward()
        optimizer.step()
    assert all(torch.equal(v, prior[k]) for k, v in module.prior_encoder.state_dict().items())
    assert not any(p.requires_grad for p in module.prior_encoder.parameters())
    assert module.residual_head.abs().sum() > 0
    moved = [n for n, p in module.encoder.named_parameters() if not torch.equal(p, module.prior_encoder.get_parameter(n))]
    assert moved
    module.eval()
    with torch.no_grad():
        module.residual_head.zero_()  # the head at 0 again: the prior's score, whatever the encoder learned
        torch.testing.assert_close(module(ids, segments), start)


def test_segment_gate_gets_the_gradient_that_the_bias_does_not():
    """At its start the gate's gradient is that of the whole attention across the pair; the
    bias at -8 gets about e^-8 of its own. Gate and bias are two ways, one at a time."""
    from parlai_poly.modules.cross_encoder import SEGMENT_BIAS_UNIT, SEGMENT_GATE_UNIT
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    backbone = BertModel(config, add_pooling_layer=False)
    (ids, segments), _ = two_text_pairs()
    gated = CrossEncoderModule(TextEncoder(backbone, pad_idx=0), head="segment-cosine", segment_gate=0.0)
    assert gated.segment_gate.shape == (2, 2)
    gated(ids, segments).sum().backward()
    gate_grad = gated.segment_gate.grad / SEGMENT_GATE_UNIT  # d score / d gate (stored / unit)
    biased = CrossEncoderModule(TextEncoder(backbone, pad_idx=0), head="segment-cosine", segment_attention_bias=-8.0)
    biased(ids, segments).sum().backward()
    bias_grad = biased.segment_bias.grad / SEGMENT_BIAS_UNIT  # d score / d bias
    assert gate_grad.abs().min() > 0
    assert gate_grad.abs().max() > 100 * bias_grad.abs().max()
    for kwargs, message in (({"segment_gate": 0.0, "segment_attention_bias": -8.0}, "give one"), ({"segment_gate": 0.0}, "segment-cosine")):
        with pytest.raises(ValueError, match=message):
            CrossEncoderModule(TextEncoder(backbone, pad_idx=0), head="segment-cosine" if "segment_attention_bias" in kwargs else "linear", **kwargs)


def test_gated_attention_across_weighs_the_other_text_by_the_match():
    """The gate adds the other text's part of one softmax over both texts: a key across that
    matches the query better takes more of it, so what a token reads across depends on the
    match; its own text's weights stay a softmax over its own keys alone."""
    from parlai_poly.modules.dropout import two_text_weights

    # one query (the first token) over four keys: two of its own text, then two of the other
    across = torch.tensor([False, False, True, True])[None, None, None, :].expand(1, 1, 4, 4)
    gate = torch.tensor([1.0])
    weak = two_text_weights(torch.tensor([0.0, 0.0, 0.0, 0.0]).expand(1, 1, 4, 4), across, gate)[0, 0, 0]
    strong = two_text_weights(torch.tensor([0.0, 0.0, 3.0, 0.0]).expand(1, 1, 4, 4), across, gate)[0, 0, 0]
    torch.testing.assert_close(weak, torch.tensor([0.5, 0.5, 0.25, 0.25]))
    torch.testing.assert_close(strong[:2], torch.tensor([0.5, 0.5]))
    e3 = torch.tensor(3.0).exp()
    torch.testing.assert_close(strong[2:], torch.stack([e3, torch.tensor(1.0)]) / (e3 + 3))
    assert strong[2:].sum() > 1.5 * weak[2:].sum()  # the better match is read more (a softmax
    # over the other text alone would read 1 of it in both)


def test_segment_attention_bias_learns_from_its_start():
    """At -8 the attention across is tiny but not cut: the bias gets a gradient, in units
    that let Adam move it a useful distance in a few hundred updates."""
    from parlai_poly.modules.cross_encoder import SEGMENT_BIAS_UNIT
    from transformers import BertConfig, BertModel

    backbone = BertModel(BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    module = CrossEncoderModule(TextEncoder(backbone, pad_idx=0), head="segment-cosine", segment_attention_bias=-8.0)
    torch.testing.assert_close(module.segment_bias * SEGMENT_BIAS_UNIT, torch.full((2,), -8.0))
    (ids, segments), _ = two_text_pairs()
    module(ids, segments).sum().backward()
    assert module.segment_bias.grad.abs().min() > 0
    with pytest.raises(ValueError, match="segment-cosine"):
        CrossEncoderModule(TextEncoder(backbone, pad_idx=0), head="linear", segment_attention_bias=-8.0)


# ---- architecture as data ------------------------------------------------------------------
def test_configs_round_trip_and_name_the_bad_option():
    from parlai_poly.modules import BiEncoderConfig, CrossEncoderConfig, ModelConfig, PolyEncoderConfig

    for config in (BiEncoderConfig(share_encoders=False), PolyEncoderConfig(poly_n_codes=16), CrossEncoderConfig()):
        assert ModelConfig.from_dict(config.to_dict()) == config
        assert type(config).from_opt(config.to_dict()) == config  # the options of the same names
    bad = [
        (PolyEncoderConfig, {"poly_n_codes": 0}, "--poly-n-codes 0"),
        (PolyEncoderConfig, {"codes_init": "zeros"}, "--codes-init zeros"),
        (PolyEncoderConfig, {"codes_attention_type": "fancy"}, "--codes-attention-type fancy"),
        (BiEncoderConfig, {"reduction_type": "last"}, "--reduction-type last"),
        (BiEncoderConfig, {"similarity": "euclid"}, "--similarity euclid"),
        (PolyEncoderConfig, {"similarity_scale": 0.0}, "--similarity-scale 0.0"),
        (CrossEncoderConfig, {"cross_segment_attention_bias": -8.0}, "--cross-segment-attention-bias"),
    ]
    for cls, values, message in bad:
        with pytest.raises(ValueError, match=message):
            cls(**values)


def test_build_module_builds_what_the_config_says():
    from parlai_poly.modules import BiEncoderConfig, PolyEncoderConfig, build_module

    encoder = FakeEncoder(dim=8)
    poly = build_module(PolyEncoderConfig(poly_n_codes=3, share_encoders=False), encoder)
    assert isinstance(poly, PolyEncoderModule) and poly.codes.shape == (3, 8)
    assert poly.candidate_encoder is not encoder and torch.equal(poly.candidate_encoder.emb.weight, encoder.emb.weight)
    bi = build_module(BiEncoderConfig(candidate_mlp=True), FakeEncoder(dim=8))
    assert bi.candidate_encoder is None and bi.candidate_mlp is not None


def test_length_groups_encode_as_one_padded_batch_values_and_gradients(tiny_backbone):
    """Rows of mixed lengths (one all padding), with segments and positions: encoded in
    length groups, every real token's output and every weight's gradient is what one padded
    batch gives."""
    from parlai_poly.backbone import load_encoder

    torch.manual_seed(0)
    encoder = TextEncoder(load_encoder(tiny_backbone), pad_idx=0).eval()
    lengths = [9, 2, 5, 0, 7, 3, 9]
    ids = torch.zeros(len(lengths), 11, dtype=torch.long)  # two columns of padding for all
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 100, (n,))
    segments = (torch.arange(11) >= 4).long().expand_as(ids)
    positions = torch.arange(11).expand_as(ids) + 1

    def outputs_and_gradients(groups):
        encoder.length_groups = groups
        encoder.zero_grad()
        hidden, mask = encoder(ids, segments, positions)
        (hidden * mask.unsqueeze(-1)).pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
        return hidden.detach(), mask, grads

    whole, mask, whole_grads = outputs_and_gradients(1)
    for groups in (2, 3, 7, 20):
        grouped, grouped_mask, grouped_grads = outputs_and_gradients(groups)
        assert torch.equal(grouped_mask, mask)
        torch.testing.assert_close(grouped[mask], whole[mask], rtol=1e-5, atol=1e-5)
        assert grouped_grads.keys() == whole_grads.keys() and whole_grads
        for name, grad in whole_grads.items():
            torch.testing.assert_close(grouped_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)



def _mixed_length_ids(rows=5, width=10):
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (rows, width))
    for row in range(rows):
        ids[row, 2 + row :] = 0  # lengths 2.. rows+1, the rest padding
    return ids


def test_inference_runs_a_bfloat16_copy_of_the_weights_made_again_when_they_change(tiny_backbone):
    """Without gradients a bfloat16 encoder runs on a bfloat16 copy of its weights: its outputs
    are exactly those of the same backbone cast to bfloat16, stay near float32's, and follow a
    change of the weights in place (an optimizer step) or a new state loaded."""
    import copy

    from parlai_poly.backbone import load_encoder

    encoder = TextEncoder(load_encoder(tiny_backbone), pad_idx=0).eval()
    encoder.compute_dtype = torch.bfloat16
    ids = _mixed_length_ids()

    def cast_backbone_outputs():
        backbone = copy.deepcopy(encoder.backbone).to(torch.bfloat16)
        return backbone(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state.float()

    with torch.no_grad():
        hidden, mask = encoder(ids)
        assert hidden.dtype == torch.float32
        assert torch.equal(hidden, cast_backbone_outputs())
        encoder.compute_dtype = None
        float32, _ = encoder(ids)
        encoder.compute_dtype = torch.bfloat16
        torch.testing.assert_close(hidden[mask], float32[mask], rtol=0.05, atol=0.05)
        for weight in encoder.parameters():
            weight.mul_(1.5)  # as an optimizer step: in place
        changed, _ = encoder(ids)
        assert torch.equal(changed, cast_backbone_outputs())
        encoder.load_state_dict({k: v * 0.5 for k, v in encoder.state_dict().items()})
        assert torch.equal(encoder(ids)[0], cast_backbone_outputs())


def test_the_bfloat16_copy_follows_train_and_eval_mode(tiny_backbone):
    """Made in training mode (a no-gradient pass while training), the copy drops out then, and
    not after the encoder is put in eval mode."""
    from parlai_poly.backbone import load_encoder

    backbone = load_encoder(tiny_backbone)
    encoder = TextEncoder(backbone, pad_idx=0).train()
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    encoder.compute_dtype = torch.bfloat16
    ids = _mixed_length_ids()
    with torch.no_grad():
        assert not torch.equal(encoder(ids)[0], encoder(ids)[0])  # training: dropout
        encoder.eval()
        assert torch.equal(encoder(ids)[0], encoder(ids)[0])


def test_with_gradients_a_bfloat16_encoder_autocasts_float32_weights(tiny_backbone):
    """Training keeps autocast: every trainable weight gets a float32 gradient."""
    from parlai_poly.backbone import load_encoder

    encoder = TextEncoder(load_encoder(tiny_backbone), pad_idx=0, freeze_embeddings=False)
    encoder.compute_dtype = torch.bfloat16
    hidden, mask = encoder(_mixed_length_ids())
    hidden[mask].sum().backward()
    grads = [w.grad for w in encoder.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_whole_backbone_in_bfloat16_trains_float32_weights_as_the_cast_backbone(tiny_backbone):
    """--precision bf16-full: with gradients the backbone runs wholly in bfloat16 (the outputs
    and gradients of the backbone cast to bfloat16, exactly), the gradients land on the
    float32 weights (frozen ones get none) within 3% of float32's, and an update in place is
    seen by the next step."""
    import copy

    from parlai_poly.backbone import load_encoder

    encoder = TextEncoder(load_encoder(tiny_backbone), pad_idx=0).eval()  # no dropout: same numbers
    encoder.compute_dtype = torch.bfloat16
    encoder.whole_backbone_in_compute_dtype = True
    ids = _mixed_length_ids()
    mask = ids != 0
    projection = torch.randn(int(mask.sum()), encoder.dim, generator=torch.Generator().manual_seed(0))

    def backward(hidden):  # a loss every output feeds (a plain sum is flat through layer norms)
        (hidden[mask] * projection).sum().backward()

    def cast_backbone_step():
        backbone = copy.deepcopy(encoder.backbone).to(torch.bfloat16)
        hidden = backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        backward(hidden)
        return hidden.detach(), {n: w.grad.float() for n, w in backbone.named_parameters() if w.grad is not None}

    def step():
        encoder.zero_grad()
        hidden, _ = encoder(ids)
        backward(hidden)
        return hidden.detach(), {n: w.grad for n, w in encoder.backbone.named_parameters() if w.grad is not None}

    hidden, grads = step()
    expected_hidden, expected_grads = cast_backbone_step()
    assert torch.equal(hidden, expected_hidden)
    trainable = {n for n, w in encoder.backbone.named_parameters() if w.requires_grad}
    assert set(grads) == trainable == set(expected_grads) and trainable
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert torch.equal(grad, expected_grads[name]), name
    encoder.compute_dtype = None
    _, float32_grads = step()
    largest = max(g.norm() for g in float32_grads.values())
    for name, grad in grads.items():
        reference = float32_grads[name]
        if reference.norm() > 1e-4 * largest:  # a key bias's gradient is 0 up to rounding
            assert (grad - reference).norm() <= 0.03 * reference.norm(), name
    encoder.compute_dtype = torch.bfloat16
    with torch.no_grad():
        for weight in encoder.parameters():
            weight.mul_(1.5)  # as an optimizer step: in place
    assert torch.equal(step()[0], cast_backbone_step()[0])


def test_attention_bias_reaches_the_bfloat16_copy(tiny_backbone):
    """A cross-encoder's per-pair attention bias gives, without gradients, what autocast gives,
    within bfloat16's error; a row of padding only (a filler: its keys all at float32's
    minimum, -inf in bfloat16) stays finite."""
    from parlai_poly.backbone import load_encoder

    encoder = TextEncoder(load_encoder(tiny_backbone), pad_idx=0).eval()
    encoder.compute_dtype = torch.bfloat16
    ids = _mixed_length_ids()
    ids[-1] = 0
    heads = encoder.backbone.config.num_attention_heads
    bias = torch.zeros(ids.size(0), heads, ids.size(1), ids.size(1))
    bias[:, :, :, :2] = -4.0  # every query attends less to the first two keys
    with torch.no_grad():
        copied, mask = encoder(ids, attention_bias=bias)
        unbiased, _ = encoder(ids)
    autocast, _ = encoder(ids, attention_bias=bias)
    assert torch.isfinite(copied).all()
    torch.testing.assert_close(copied[mask], autocast.detach()[mask], rtol=0.05, atol=0.05)
    assert not torch.allclose(copied[mask], unbiased[mask], atol=0.05)
