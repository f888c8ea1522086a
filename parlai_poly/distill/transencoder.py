"""Trans-Encoder (Liu et al., ICLR 2022): bi- and cross-encoder teach each other, no labels.

    python -m parlai_poly.distill.transencoder --task T --eval-task T2 --cycles K --out DIR

Cycle 0 is the backbone as an untrained (zero-shot) bi-encoder. Each cycle k = 1..K then
1. trains the cross-encoder (from the backbone at k = 1, else from cycle k-1's) on the
   pseudo-labels of cycle k-1's bi-encoder: BCE against sigmoid(z(bi score)) (--cross-loss);
2. trains the bi-encoder (from cycle k-1's) on the new cross-encoder's scores: MSE
   regression of standardized scores (--bi-loss);
3. evaluates both on --eval-task (ParlAI's eval_model, labels used only to measure).
Training reads (context, response) pairs from --task and scores every context against every
response of its batch (--candidates batch) with --distill-weight 1: the task's labels are
never supervision, the batch's other responses are just more pairs for the teacher to label.

--seed-per-cycle: each cycle trains with other seeds (--seed + k - 1 for cycle k; with --mutual
--seed + 2(k - 1), B one more), so each cycle draws other pairs from --task; with one seed
every cycle trains on the same few thousand pairs again.

--mutual trains two of each: model A on --hf-model, model B on --hf-model-b (a second
backbone), or, without one, on the same backbone with another seed. Each student learns
from the mean of both teachers' scores (Trans-Encoder's mutual distillation).

Model files go to DIR/cycle{k}_{bi,cross}/model (model B: DIR/cycle{k}_{bi,cross}_b/model),
teacher scores to DIR/teacher_scores, and after each cycle the evaluations are written to
DIR/results.json (atomically). Run the same command again to resume: finished cycles are
skipped, an interrupted training continues from ParlAI's last save, and a larger --cycles
extends a finished run. `python -m benchmarks.distill_report --loop DIR/results.json`
tabulates and plots it.
"""
import argparse
import json
import os
import time
from typing import Dict, List, Optional

from parlai.utils import logging

from ..errors import ParlaiPolyError
from ..storage import atomic_write_text
from ..modules.cross_encoder import CROSS_HEADS, NEEDS_SEGMENT_COSINE
from .losses import LOSSES

FORMAT = "parlai_poly.transencoder"
VERSION = 1
REPORTED = ("mrr", "hits@1", "rank", "exs", "loss")  # kept from eval_model's report, and every R@k/N
# everything that makes one run's cycles comparable; --cycles may grow on a resumed run
CONFIG_KEYS = (
    "task", "eval_task", "eval_datatype", "eval_max_examples", "datapath", "mutual", "hf_model",
    "hf_model_b", "bi_steps", "cross_steps", "bi_batchsize", "cross_batchsize", "lr",
    "warmup_updates", "text_truncate", "label_truncate", "bi_loss", "cross_loss", "temperature",
    "cross_head", "cross_segment_attention_bias", "seed", "seed_per_cycle", "set",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parlai_poly.distill.transencoder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", required=True, help="ParlAI task whose (context, label) pairs are the training pairs")
    p.add_argument("--eval-task", required=True, help="ParlAI task every cycle's models are evaluated on")
    p.add_argument("--cycles", type=int, default=3, help="K, bi -> cross -> bi cycles (Trans-Encoder: 3)")
    p.add_argument("--out", required=True, help="folder for model files, teacher scores and results.json")
    p.add_argument("--mutual", action="store_true", help="two models of each kind teach with their mean score")
    p.add_argument("--hf-model", default=None, help="backbone (default: the agents' all-MiniLM-L6-v2)")
    p.add_argument("--hf-model-b", default=None, help="--mutual: model B's backbone (default: --hf-model, another seed)")
    p.add_argument("--datapath", default=None, help="ParlAI datapath")
    p.add_argument("--eval-datatype", default="test", help="split of --eval-task (default test)")
    p.add_argument("--eval-max-examples", type=int, default=1024, help="examples evaluated (-1: all)")
    p.add_argument("--eval-batchsize", type=int, default=32)
    p.add_argument("--bi-steps", type=int, default=150, help="updates of each bi-encoder per cycle")
    p.add_argument("--cross-steps", type=int, default=200, help="updates of each cross-encoder per cycle")
    p.add_argument("--bi-batchsize", type=int, default=32, help="bi: B contexts x B responses per update")
    p.add_argument("--cross-batchsize", type=int, default=8, help="cross: B x B pairs per update")
    p.add_argument(
        "--lr",
        type=float,
        default=1e-5,
        help="learning rate of every training: on CCC at 5e-5 the first cycle's cross-encoder fell "
        "below its zero-shot start (R@1/20 0.477 vs 0.491), at 1e-5 it rose above it (0.524)",
    )
    p.add_argument("--warmup-updates", type=int, default=20)
    p.add_argument("--text-truncate", type=int, default=64)
    p.add_argument("--label-truncate", type=int, default=32)
    p.add_argument("--bi-loss", default="mse", choices=sorted(LOSSES), help="--distill-loss of the bi-encoder students")
    p.add_argument("--cross-loss", default="bce", choices=sorted(LOSSES), help="--distill-loss of the cross-encoder students")
    p.add_argument(
        "--cross-head",
        default="segment-cosine",
        choices=CROSS_HEADS,
        help="--cross-head of the cross-encoders: segment-cosine starts from what the backbone "
        "ranks as a bi-encoder; linear (the paper's) starts at chance, which is all the first "
        "cycle's cross-encoder would then hand on",
    )
    p.add_argument(
        "--cross-segment-attention-bias",
        type=float,
        default=None,
        help="--cross-segment-attention-bias of the cross-encoders (e.g. -8; needs segment-cosine): "
        "the first cycle's cross-encoder then starts from the zero-shot bi-encoder's weights as "
        "that bi-encoder, not below it. Unset: full attention from the backbone",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="--distill-temperature of every student")
    p.add_argument("--seed", type=int, default=1, help="ParlAI --seed of model A's trainings (B: seed + 1)")
    p.add_argument(
        "--seed-per-cycle",
        action="store_true",
        help="cycle k trains with --seed + k - 1 (--mutual: + 2(k - 1), model B one more), so "
        "each cycle draws other pairs from --task; otherwise every cycle trains on the same "
        "pairs again",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other ParlAI option for every training and evaluation, e.g. --set "
        "freeze_embeddings=false or a task's own options (VALUE read as JSON when it parses, "
        "else as text); repeat for several",
    )
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.cycles < 1:
        p.error("--cycles must be at least 1")
    if args.cross_segment_attention_bias is not None and args.cross_head != "segment-cosine":
        p.error(NEEDS_SEGMENT_COSINE)
    args.set = dict(sorted(parse_setting(s) for s in args.set))
    return args


def parse_setting(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ParlaiPolyError(f"--set {text}: expected KEY=VALUE")
    try:
        value = json.loads(value)
    except ValueError:
        pass
    return key.strip().lstrip("-").replace("-", "_"), value


class TransEncoderLoop:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = args.out
        self.results_path = os.path.join(self.out, "results.json")
        self.members = ["a", "b"] if args.mutual else ["a"]
        self.config = {key: getattr(args, key) for key in CONFIG_KEYS}

    # ---- layout -------------------------------------------------------------------------
    def model_file(self, cycle: int, kind: str, member: str) -> str:
        suffix = "" if member == "a" else "_b"
        return os.path.join(self.out, f"cycle{cycle}_{kind}{suffix}", "model")

    def name(self, kind: str, member: str) -> str:
        return kind if member == "a" else f"{kind}_b"

    def backbone(self, member: str) -> Optional[str]:
        if member == "b" and self.args.hf_model_b:
            return self.args.hf_model_b
        return self.args.hf_model

    def cycle_files(self, cycle: int) -> List[str]:
        kinds = ("bi",) if cycle == 0 else ("cross", "bi")
        return [self.model_file(cycle, kind, m) for kind in kinds for m in self.members]

    # ---- results.json -------------------------------------------------------------------
    def load_results(self) -> Dict:
        if not os.path.exists(self.results_path):
            return {"format": FORMAT, "version": VERSION, "config": self.config, "cycles": []}
        with open(self.results_path, encoding="utf-8") as f:
            results = json.load(f)
        if results.get("format") != FORMAT:
            raise ParlaiPolyError(f"{self.results_path}: not a Trans-Encoder results file.")
        old = results.get("config", {})
        # a key missing from an older run's config is an option added since: that run had its default
        parser = build_parser()
        changed = sorted(k for k in CONFIG_KEYS if old.get(k, parser.get_default(k)) != self.config.get(k))
        if changed:
            raise ParlaiPolyError(
                f"{self.out} holds a run with other settings (changed: {', '.join(changed)}); "
                "resume it with the same options, or give another --out."
            )
        return results

    def save_results(self, results: Dict) -> None:
        results["cycles_requested"] = self.args.cycles
        atomic_write_text(self.results_path, json.dumps(results, indent=2) + "\n")

    def finished(self, results: Dict) -> int:
        """How many leading cycles are recorded with their model files on disk."""
        done = 0
        for entry in results["cycles"]:
            if entry.get("cycle") != done or not all(os.path.isfile(f) for f in self.cycle_files(done)):
                break
            done += 1
        return done

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> Dict:
        results = self.load_results()
        done = self.finished(results)
        results["cycles"] = results["cycles"][:done]  # anything after a gap is redone
        if done:
            logging.info(f"Trans-Encoder: {self.results_path} has cycles 0..{done - 1}; resuming")
        for cycle in range(done, self.args.cycles + 1):
            began = time.time()
            entry = self.zero_shot() if cycle == 0 else self.cycle(cycle)
            entry["seconds"] = round(time.time() - began, 1)
            results["cycles"].append(entry)
            self.save_results(results)
            logging.info(f"Trans-Encoder: cycle {cycle} done: {summary(entry)}")
        self.save_results(results)
        return results

    def zero_shot(self) -> Dict:
        """Cycle 0: each backbone as a bi-encoder, untrained, saved and evaluated."""
        models = {}
        for member in self.members:
            path = self.model_file(0, "bi", member)
            if not os.path.isfile(path):
                logging.info(f"Trans-Encoder cycle 0: the backbone as a zero-shot bi-encoder -> {path}")
                save_untrained_bi(path, self.backbone(member), self.args)
            models[self.name("bi", member)] = self.evaluated(path)
        return {"cycle": 0, "models": models}

    def cycle(self, k: int) -> Dict:
        bi_teachers = [self.model_file(k - 1, "bi", m) for m in self.members]
        for member in self.members:
            init = self.model_file(k - 1, "cross", member) if k > 1 else self.first_cross_init(member)
            logging.info(f"Trans-Encoder cycle {k}/{self.args.cycles}: cross-encoder {member} from {', '.join(bi_teachers)}")
            self.train("cross", k, member, init, bi_teachers)
        cross_teachers = [self.model_file(k, "cross", m) for m in self.members]
        for member in self.members:
            logging.info(f"Trans-Encoder cycle {k}/{self.args.cycles}: bi-encoder {member} from {', '.join(cross_teachers)}")
            self.train("bi", k, member, self.model_file(k - 1, "bi", member), cross_teachers)
        models = {}
        for kind in ("cross", "bi"):
            for member in self.members:
                models[self.name(kind, member)] = self.evaluated(self.model_file(k, kind, member))
        teachers = {"cross": bi_teachers, "bi": cross_teachers}
        return {"cycle": k, "models": models, "teachers": teachers}

    def first_cross_init(self, member: str) -> Optional[str]:
        """Cycle 1's cross-encoder: from the backbone, or as the zero-shot bi-encoder itself."""
        if self.args.cross_segment_attention_bias is None:
            return None
        return self.model_file(0, "bi", member)

    def train(self, kind: str, k: int, member: str, init_model: Optional[str], teachers: List[str]) -> None:
        from parlai.scripts.train_model import TrainModel

        from .. import compat

        compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI builds or parses anything

        TrainModel.main(**self.train_options(kind, k, member, init_model, teachers))

    def train_options(self, kind, k, member, init_model, teachers) -> Dict:
        a = self.args
        options = dict(
            task=a.task,
            model=f"parlai_poly.agents:{kind}",
            model_file=self.model_file(k, kind, member),
            candidates="batch",  # every context against every response of its batch
            batchsize=a.bi_batchsize if kind == "bi" else a.cross_batchsize,
            max_train_steps=a.bi_steps if kind == "bi" else a.cross_steps,
            learningrate=a.lr,
            warmup_updates=a.warmup_updates,
            text_truncate=a.text_truncate,
            label_truncate=a.label_truncate,
            distill_teacher=",".join(teachers),
            distill_loss=a.bi_loss if kind == "bi" else a.cross_loss,
            distill_weight=1.0,  # the task's labels are never supervision
            distill_temperature=a.temperature,
            distill_cache_dir=os.path.join(self.out, "teacher_scores"),
            seed=self.seed(k, member),
            # ParlAI's end-of-training evaluation on --task: kept as short as it goes
            validation_every_n_epochs=-1,
            validation_max_exs=8,
            short_final_eval=True,
            log_every_n_secs=60,
        )
        if kind == "cross":
            options["cross_head"] = a.cross_head
            if a.cross_segment_attention_bias is not None:
                options["cross_segment_attention_bias"] = a.cross_segment_attention_bias
        if self.backbone(member):  # unset: the agents' default backbone (None would be read as text)
            options["hf_model"] = self.backbone(member)
        if a.datapath:
            options["datapath"] = a.datapath
        if init_model:
            options["init_model"] = init_model
        options.update(a.set)
        return options

    def seed(self, k: int, member: str) -> int:
        """The --seed of cycle k's trainings of one member (it fixes which pairs it draws)."""
        cycle_offset = (k - 1) * len(self.members) if self.args.seed_per_cycle else 0
        return self.args.seed + cycle_offset + self.members.index(member)

    def evaluated(self, model_file: str) -> Dict:
        from parlai.scripts.eval_model import EvalModel

        a = self.args
        options = dict(
            model_file=model_file,
            task=a.eval_task,
            datatype=a.eval_datatype,
            num_examples=a.eval_max_examples,
            batchsize=a.eval_batchsize,
            log_every_n_secs=60,
        )
        if a.datapath:
            options["datapath"] = a.datapath
        options.update({k: v for k, v in a.set.items() if k not in options})  # e.g. the task's options
        report = EvalModel.main(**options)
        metrics = {k: round(float(v), 5) for k, v in report.items() if k in REPORTED or k.startswith("R@")}
        return {"model_file": model_file, "metrics": metrics}


def save_untrained_bi(path: str, hf_model: Optional[str], args: argparse.Namespace) -> None:
    """The backbone as a bi-encoder model file, as the agent builds it, no training."""
    from parlai.core.agents import create_agent
    from parlai.core.params import ParlaiParser

    from .. import compat

    compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI builds or parses anything

    options = dict(
        model="parlai_poly.agents:bi",
        model_file=path,
        datatype="valid",  # no optimizer: nothing but weights to save
        text_truncate=args.text_truncate,
        label_truncate=args.label_truncate,
    )
    if hf_model:
        options["hf_model"] = hf_model
    if args.datapath:
        options["datapath"] = args.datapath
    # the options that shape the bi-encoder itself (e.g. reduction_type) come from --set
    agent_keys = (
        "reduction_type", "reduction_first_m", "share_encoders", "similarity", "similarity_scale",
        "freeze_embeddings", "special_tok_lst",
    )
    options.update({k: v for k, v in args.set.items() if k in agent_keys})
    opt = ParlaiParser(True, True).parse_kwargs(**options)
    create_agent(opt).save(path)


def summary(entry: Dict, metric: str = "R@1/") -> str:
    parts = []
    for name, model in entry["models"].items():
        values = [f"{k} {v:.4f}" for k, v in model["metrics"].items() if k.startswith(metric)]
        parts.append(f"{name}: {', '.join(values[:1]) or 'no ' + metric}")
    return "; ".join(parts)


def main(argv: Optional[List[str]] = None) -> Dict:
    from ..errors import report_bad_input_on_exit

    report_bad_input_on_exit()
    return TransEncoderLoop(parse_args(argv)).run()


if __name__ == "__main__":
    main()
