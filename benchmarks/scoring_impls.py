"""The scoring benchmark's implementations, built at one size: ours (parlai_poly's modules,
called through the same functions our agents call) and ParlAI 1.7.2's own modules, as its
agents call them; and the cascade, through the functions the poly agent's retrieve and rerank
runs (``parlai_poly.ranking``). Each builder returns an ``Impl``; the harness
(``scoring_speed``) times them and ``scoring_report`` turns the timings into the table."""
import math
import time

from benchmarks.scoring_constants import CASCADE, MIXED_LENGTHS, OUR_CROSS_PAIRS_PER_PASS, RESCORE_TOP_K


OUR_WEIGHTS_SEED = 0


class _FakeParlaiDict:
    """What ParlAI's modules read from a DictionaryAgent: len(), tok2ind, the null token."""

    null_token = "__null__"

    def __init__(self, size):
        self.size = size
        self.tok2ind = {self.null_token: 0}

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        return self.tok2ind[key]


def parlai_opt(cfg, model):
    """The options ParlAI's modules read, at the size of ``cfg``.

    variant xlm (post-layer-norm with a layer norm on the embeddings), gelu, learned
    positions and two segment embeddings: BERT's architecture, which is also how ParlAI's
    pretrained bi/poly/cross-encoders are configured.
    """
    opt = dict(
        n_layers=cfg["layers"],
        n_encoder_layers=-1,
        embedding_size=cfg["dim"],
        n_heads=cfg["heads"],
        ffn_size=cfg["ffn"],
        dropout=0.0,
        attention_dropout=0.0,
        relu_dropout=0.0,
        activation="gelu",
        variant="xlm",
        n_positions=cfg["max_positions"],
        learn_positional_embeddings=True,
        embeddings_scale=False,
        n_segments=2,
        output_scaling=1.0,
        checkpoint_activations=False,
        reduction_type="mean",
        # TransformerMemNetModel (the bi-encoder)
        share_word_embeddings=True,
        learn_embeddings=True,
        share_encoders=False,
        wrap_memory_encoder=False,
        memory_attention="sqrt",
        normalize_sent_emb=False,
        # PolyEncoderModule
        polyencoder_type="codes",
        poly_n_codes=64,
        poly_attention_type="basic",
        poly_attention_num_heads=4,
        codes_attention_type="basic",
        codes_attention_num_heads=4,
    )
    if model == "cross":
        opt["reduction_type"] = "first"
    if model.startswith("poly-"):
        opt["poly_n_codes"] = int(model.split("-")[1])
        opt["reduction_type"] = "first"  # candidate side only; cached here
    return opt


class Impl:
    """encode(ids) -> context; score(context, cached) -> [1, N]; cached(cands [N, d]).

    For cross: pairs(ctx_ids [1, T], cand_ids [P, L]) -> [1, P].
    """

    encode = score = pairs = None

    @staticmethod
    def cached(cands):
        return cands

    @staticmethod
    def store(cached):
        """What the scoring pass reads of ``cached(cands)``."""
        return cached


def our_config(model: str):
    """The agents' default architecture for a benchmark model name (bi, poly-M, cross)."""
    from parlai_poly.modules import BiEncoderConfig, CrossEncoderConfig, PolyEncoderConfig

    if model == "bi":
        return BiEncoderConfig()
    if model.startswith("poly-"):
        return PolyEncoderConfig(poly_n_codes=int(model.split("-")[1]))
    return CrossEncoderConfig()


def build_ours(cfg, model):
    import torch
    from transformers import BertConfig, BertModel

    from parlai_poly.modules import TextEncoder, build_module

    config = BertConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["dim"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        intermediate_size=cfg["ffn"],
        max_position_embeddings=cfg["max_positions"],
        type_vocab_size=2,
        hidden_act="gelu",
    )
    # the same weights for every one of ours (float32, bf16, int8 stores), so their rankings
    # compare; the global random state is left as it was
    with torch.random.fork_rng():
        torch.manual_seed(OUR_WEIGHTS_SEED)
        # as parlai_poly.backbone.load_encoder: a bare encoder, no pooler
        backbone = BertModel(config, add_pooling_layer=False)
        encoder = TextEncoder(backbone, pad_idx=0)
        module = build_module(our_config(model), encoder)
    impl = Impl()
    if model == "bi":
        impl.encode = module.encode_context
        impl.score = module.score
    elif model.startswith("poly-"):
        impl.encode = module.encode_context
        impl.score = lambda context, cands: module.score(context[0], context[1], cands)
    else:
        impl.pairs = _our_cross_pairs(module)
    module.eval()
    impl.module = module
    return impl


def _our_cross_pairs(module):
    """pairs(ctx_ids [1, T], cand_ids [P, L]) -> [1, P] through the cross agent's own
    score_pairs: pairs sorted by length, passes of 256 each padded to its own longest pair."""
    import torch

    from parlai_poly.modules.cross_encoder import score_pairs

    def pairs(ctx_ids, cand_ids):
        n = cand_ids.size(0)
        context_index, cand_index = torch.zeros(n, dtype=torch.long), torch.arange(n)
        return score_pairs(module, ctx_ids, cand_ids, context_index, cand_index, 0, False, OUR_CROSS_PAIRS_PER_PASS).view(1, n)

    return pairs


def build_ours_store(cfg, model, dtype):
    """Our bi- or poly-encoder over a candidate store kept in ``dtype`` (bfloat16 or int8),
    as the agents score one (--candidate-store-dtype): the pass over the compact copy, then
    each context's top RESCORE_TOP_K scored again from the float32 encodings."""
    if model != "bi" and not model.startswith("poly-"):
        return None
    from parlai_poly.modules.stored import StoredCandidates, rescore_top

    impl = build_ours(cfg, model)
    score = impl.score

    def rescored(context, cached):
        stored, exact = cached  # the compact copy, and the float32 [N, d] it rescores from
        return rescore_top(score(context, stored), lambda top: score(context, top), exact, RESCORE_TOP_K)

    impl.score = rescored
    impl.cached = lambda cands: (StoredCandidates.quantize(cands, dtype), cands)  # both kept, as a store keeps them
    impl.store = lambda cached: cached[0]  # what the scoring pass reads (the chunk sweep times it alone)
    return impl


def build_ours_bf16(cfg, model):
    return build_ours_store(cfg, model, "bfloat16")


def build_ours_int8(cfg, model):
    return build_ours_store(cfg, model, "int8")


def build_parlai(cfg, model):
    import types
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation from parlai.core.opt
        from parlai.agents.transformer.crossencoder import CrossEncoderModule, CrossencoderAgent
        from parlai.agents.transformer.modules import TransformerMemNetModel
        from parlai.agents.transformer.polyencoder import PolyEncoderModule
        from parlai.agents.transformer.transformer import TransformerRankerAgent

    opt = parlai_opt(cfg, model)
    dictionary = _FakeParlaiDict(cfg["vocab"])
    impl = Impl()
    if model == "bi":
        module = TransformerMemNetModel(opt, dictionary)
        # TransformerRankerAgent.score_candidates with cached (fixed) candidate encodings
        impl.encode = lambda ids: module(xs=ids, mems=None, cands=None)[0]
        impl.score = lambda context, cands: TransformerRankerAgent._score(None, context, cands)
    elif model.startswith("poly-"):
        module = PolyEncoderModule(opt, dictionary, 0)
        # PolyencoderAgent.get_ctxt_rep / get_scores; its cached encodings are [1, N, d]
        impl.encode = lambda ids: module(ctxt_tokens=ids)[:2]
        impl.score = lambda context, cands: module(ctxt_rep=context[0], ctxt_rep_mask=context[1], cand_rep=cands)
        impl.cached = lambda cands: cands.unsqueeze(0)  # PolyencoderAgent._make_candidate_encs
    else:
        module = CrossEncoderModule(opt, dictionary, 0)
        agent = types.SimpleNamespace(model=module, use_cuda=False, NULL_IDX=0)

        def pairs(ctx_ids, cand_ids):  # ParlAI's own CrossencoderAgent.score_candidates
            batch = types.SimpleNamespace(text_vec=ctx_ids)
            return CrossencoderAgent.score_candidates(agent, batch, cand_ids.unsqueeze(0))

        impl.pairs = pairs
    module.eval()
    impl.module = module
    return impl


def build_parlai_ranker(cfg, model):
    """ParlAI's modules; none for the cascades (ParlAI has no retrieve-and-rerank)."""
    if model.startswith("cascade"):
        return None
    return build_parlai(cfg, "cross" if model == "cross-mixed" else model)


def build_ours_ranker(cfg, model):
    if model.startswith("cascade"):
        return build_cascade(cfg, model)
    return build_ours(cfg, "cross" if model == "cross-mixed" else model)


BUILDERS = {
    "ours": build_ours_ranker,
    "ours_bf16": build_ours_bf16,
    "ours_int8": build_ours_int8,
    "parlai": build_parlai_ranker,
}


def clustered_candidates(n, dim, topics, seed, step=100000):
    """[n, dim] unit vectors around ``topics`` random directions (noise as large as the
    topic): sentence encodings cluster by topic, and an ANN index's recall on isotropic
    random vectors (no structure at all) says little about real encodings."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(topics, dim, generator=gen)
    out = torch.empty(n, dim)
    for start in range(0, n, step):  # in steps: no [n, dim] temporaries beside the output
        rows = min(step, n - start)
        x = centers[torch.randint(0, topics, (rows,), generator=gen)] + torch.randn(rows, dim, generator=gen)
        out[start : start + rows] = x / x.norm(dim=1, keepdim=True)
    return out


def mixed_token_ids(torch, gen, rows, vocab):
    """[rows, 64] candidates of chit-chat-like lengths (MIXED_LENGTHS), right-padded with 0."""
    m = MIXED_LENGTHS
    lengths = torch.empty(rows).normal_(m["log_mean"], m["log_std"], generator=gen).exp().round()
    lengths = lengths.clamp(m["low"], m["high"]).long()
    ids = torch.randint(5, vocab, (rows, m["high"]), generator=gen)
    ids[:, 0] = 1
    ids[torch.arange(rows), lengths - 1] = 2  # [SEP] ends each candidate
    ids[torch.arange(m["high"]).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return ids


def build_cascade(cfg, model):
    """encode(ids) -> ids; cached(encs) -> what retrieval needs (hnsw: the index, built and
    timed here, with its recall@K against exact); score(ids, cached) -> [1, N]: bi top-K,
    poly-64 orders them, cross reorders the best 10, the rest tie below (as with hnsw)."""
    import types

    import torch

    from parlai_poly import ranking

    bi, poly, cross = build_ours(cfg, "bi"), build_ours(cfg, CASCADE["poly"]), build_ours(cfg, "cross")
    gen = torch.Generator().manual_seed(7)
    # the cross-encoder reads the picked candidates' tokens: a pool of chit-chat-like ones
    pool = mixed_token_ids(torch, gen, CASCADE["cross_pool"], cfg["vocab"])
    impl = Impl()
    impl.module = poly.module
    impl.encode = lambda ids: ids
    k, rerank = CASCADE["retrieve_top_k"], CASCADE["rerank_top_k"]

    def retrieve(context, cached):  # [1, d] -> [1, K]
        if cached.index is None:
            return bi.module.score(context, cached.encs).topk(min(k, len(cached.encs)), dim=1).indices
        from parlai_poly.retrieval_index import search

        return search(cached.index, context, min(k, len(cached.encs)), CASCADE["hnsw_ef_search"])

    def score(ids, cached):  # the poly agent's cascade (RetrieveAndRerank.scores), one context
        top = retrieve(bi.encode(ids), cached)
        context = poly.encode(ids)
        top = ranking.rerank_head(top, lambda picked: poly.module.score(context[0], context[1], cached.encs[picked]))
        top = ranking.rerank_head(top, lambda head: cross.pairs(ids, pool[head[0] % len(pool)]), rerank)
        return ranking.cascade_scores(top, torch.zeros(1, len(cached.encs)))

    def cached(encs):
        out = types.SimpleNamespace(encs=encs, index=None, info={})
        if model == "cascade-hnsw":
            out.index, out.info = _hnsw_with_recall(encs, bi)
        return out

    impl.score, impl.cached = score, cached
    return impl


def _hnsw_with_recall(encs, bi):
    """The HNSW index over encs, its build time and recall@K against exact retrieval, over
    queries near candidates (a context near its response: a candidate plus noise)."""
    import torch

    from parlai_poly.retrieval_index import build_hnsw, search

    began = time.perf_counter()
    index = build_hnsw(encs, CASCADE["hnsw_m"], CASCADE["hnsw_ef_construction"], desc=f"HNSW index of {len(encs):,}")
    seconds = time.perf_counter() - began
    gen = torch.Generator().manual_seed(11)
    picks = torch.randint(0, len(encs), (CASCADE["recall_queries"],), generator=gen)
    queries = encs[picks] + 0.5 * torch.randn(len(picks), encs.size(1), generator=gen) / math.sqrt(encs.size(1))
    k = min(CASCADE["retrieve_top_k"], len(encs))
    exact = bi.module.score(queries, encs).topk(k, dim=1).indices
    by_ef = {}
    for ef in sorted({64, 128, 256, 512, CASCADE["hnsw_ef_search"]}):  # the recall / time trade-off
        began = time.perf_counter()
        found = search(index, queries, k, ef)
        ms = 1000 * (time.perf_counter() - began) / len(picks)
        hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist()))
        by_ef[str(max(ef, k))] = {"recall": round(hits / (k * len(picks)), 4), "search_ms": round(ms, 3)}
    info = {"hnsw_build_s": round(seconds, 2), "k": k, "recall_queries": len(picks),
            "recall_at_k": by_ef[str(max(CASCADE["hnsw_ef_search"], k))]["recall"], "by_ef_search": by_ef,
            **{name: CASCADE[name] for name in ("hnsw_m", "hnsw_ef_search", "hnsw_ef_construction")}}
    return index, info
