"""What the scoring benchmark measures: its models, implementations, sizes and settings,
shared by its harness (scoring_speed), implementations (scoring_impls) and report
(scoring_report)."""

MODELS = ("bi", "poly-16", "poly-64", "poly-360", "cross", "cross-mixed", "cascade-exact", "cascade-hnsw")

# ours_bf16, ours_int8: our bi- and poly-encoders over a bfloat16 or int8 candidate store
# (--candidate-store-dtype), the top RESCORE_TOP_K rescored in float32; the cascades are ours only
IMPLS = ("ours", "ours_bf16", "ours_int8", "parlai")

IMPL_NAMES = {"ours": "ours", "ours_bf16": "ours bf16", "ours_int8": "ours int8", "parlai": "ParlAI 1.7.2"}

# the candidate store's dtype of each of our implementations (ours: float32, as ParlAI's)
STORE_DTYPE = {"ours": "float32", "ours_bf16": "bfloat16", "ours_int8": "int8", "parlai": "float32"}

MILLION = 1_000_000


def context_vectors(model):
    """m of a poly-m model, 1 for the bi-encoder's one context vector."""
    return int(model.split("-")[1]) if model.startswith("poly-") else 1


# Candidate lengths of the cross-mixed row: a log-normal fitted to the MiniLM token counts
# ([CLS] and [SEP] included) of CCC's 13,034 test responses (median 18, 90th percentile 44,
# mean 24; 3.4% over 64, truncated there as --label-truncate 64 does): many short, few long.
MIXED_LENGTHS = dict(log_mean=2.885, log_std=0.723, low=3, high=64)

# The cascade rows, as the poly agent's retrieve-and-rerank options run it: bi top-100
# (exact, or an HNSW index) -> poly-64 orders them -> cross reorders the best 10.
CASCADE = dict(retrieve_top_k=100, poly="poly-64", rerank_top_k=10, hnsw_m=32, hnsw_ef_search=128,
               hnsw_ef_construction=40, recall_queries=50, topics=1024, cross_pool=1000)

# the agents' --rescore-top-k default with --cap-num-predictions 100: the top 100 in float32
RESCORE_TOP_K = 100

# The chunk-size sweep (candidates per chunk) of the fused poly pass, and the default the
# module's memory budget gives (see PolyEncoderModule.default_chunk_size), for SWEEP_MODEL
CHUNK_SWEEP = (2048, 8192, 32768, 131072)
CHUNK_SWEEP_QUICK = (16, 64, 256)
SWEEP_MODEL = "poly-64"

# The machine's limits: a plain copy of COPY_MIB (its bytes moved, read plus written, per
# second: the bandwidth a read of the cached candidates can reach) and a plain bfloat16 GEMM
# of each row's shape, [N, d] x [d, m] (bi: m = GEMM_MIN_M, since a matrix-vector product
# has no FLOP rate of its own: it is bound by the read)
COPY_MIB = 1024
COPY_MIB_QUICK = 32
GEMM_MIN_M = 16

# all-MiniLM-L6-v2's size (its config.json), and a tiny one for --quick
MINILM = dict(layers=6, dim=384, heads=12, ffn=1536, vocab=30522, max_positions=512)

TINY = dict(layers=2, dim=32, heads=4, ffn=64, vocab=1000, max_positions=128)

# as CrossEncoderAgent scores pairs: --cross-pairs-per-pass defaults to 256
OUR_CROSS_PAIRS_PER_PASS = 256

# The paper's Table 5, CPU column (BERT-base size, a many-core CPU), ms per context
PAPER_CPU_MS = {
    "bi": {1000: 115, 100000: 160},
    "poly-16": {1000: 122, 100000: 678},
    "poly-64": {1000: 126, 100000: 692},
    "poly-360": {1000: 160, 100000: 837},
    "cross": {1000: 21700, 100000: 2200000},
}
