"""Every fix ParlAI 1.7.2 needs to run on today's torch, numpy and setuptools, in one place.

``apply()`` runs when ``parlai_poly.agents`` is imported, which ParlAI does while parsing
``-m parlai_poly.agents:...`` or loading a model file of ours, before any agent is built.
Fixes that cannot wait for that import (ParlAI's own modules import them first) are install
pins, listed in ``INSTALL_PINS`` and enforced by ``constraints.txt`` and ``setup.py``.
"""
import contextlib
import copy
import gc
import traceback

import torch
import torch.distributed as dist

INSTALL_PINS = {
    # parlai/core/opt.py does `import pkg_resources`, which setuptools 81 removed; the `parlai`
    # console script imports it before any plugin code can run, so only a pin can fix it.
    "setuptools": "<81",
    # BleuMetric.compute returns None without nltk, and the first validation then crashes.
    "nltk": "any",
}

_applied = False


def _plateau_scheduler_without_verbose():
    """torch 2.7 removed ReduceLROnPlateau(verbose=), which every ParlAI agent passes."""
    from parlai.nn import lr_scheduler

    def __init__(self, optimizer, patience, decay, warmup_updates, warmup_rate):
        lr_scheduler.ParlAILRScheduler.__init__(self, warmup_updates, warmup_rate)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, "min", factor=decay, patience=patience
        )

    lr_scheduler.ReduceOnPlateauLRScheduler.__init__ = __init__


def _all_gather_list_on_cpu():
    """parlai.utils.distributed.all_gather_list builds its buffers with .cuda()."""
    from parlai.scripts import eval_model, train_model
    from parlai.utils import distributed

    gather_on_gpu = distributed.all_gather_list

    def all_gather_list(data):
        if torch.cuda.is_available() or not distributed.is_distributed():
            return gather_on_gpu(data)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, data)
        return gathered

    for module in (distributed, train_model, eval_model):  # the scripts import it by name
        module.all_gather_list = all_gather_list


def _distributed_context_on_cpu():
    """distributed_context hard-codes nccl and CUDA devices; without a GPU, use gloo."""
    from parlai.utils import distributed

    context_on_gpu = distributed.distributed_context

    @contextlib.contextmanager
    def distributed_context(rank, opt, rank_offset=0, gpu=None, init_method="tcp://localhost:61337"):
        if (opt.get("distributed_world_size") or 0) < 1:  # TCPStore's "world size cannot be 0"
            from .errors import ParlaiPolyError

            raise ParlaiPolyError(
                f"--distributed-world-size is {opt.get('distributed_world_size')}: ParlAI defaults it to "
                f"the number of GPUs, {torch.cuda.device_count()} here. Pass --distributed-world-size N "
                "for N worker processes (on CPU too)."
            )
        if torch.cuda.is_available():
            with context_on_gpu(rank, opt, rank_offset, gpu, init_method) as gpu_opt:
                yield gpu_opt
            return
        opt = copy.deepcopy(opt)
        opt["rank"] = rank = rank + rank_offset
        opt["gpu"] = -1
        opt.setdefault("override", {})["gpu"] = -1
        quiet = not opt.get("verbose") and rank != 0
        with distributed.override_print(quiet, None if rank == 0 else f"rank:{rank:3d} |"):
            dist.init_process_group("gloo", init_method=init_method, world_size=opt["distributed_world_size"], rank=rank)
            torch.manual_seed(42)
            distributed.sync_object(None)
            try:
                yield opt
            finally:
                dist.destroy_process_group()

    distributed.distributed_context = distributed_context


def _join_device_on_cpu():
    """ParlAI's joinable train loop and evaluator give torch's Join opt['gpu'], -1 on CPU."""
    from parlai.utils import fsdp

    for joinable in (fsdp.JoinableTrainLoop, fsdp.JoinableEvaluator):
        on_gpu = joinable.join_device.fget
        joinable.join_device = property(
            lambda self, on_gpu=on_gpu: on_gpu(self) if torch.cuda.is_available() else torch.device("cpu")
        )


def _text_format_sharded_in_distributed_eval():
    """ParlAIDialogTeacher (fromfile:parlaiformat, and every task in ParlAI's text format) gives
    each worker of a distributed evaluation every example, where DialogTeacher gives each its
    share: `parlai multiprocessing_eval` with 2 workers counted every example twice (exs 2N).
    Keep worker r's share, every W-th episode from the r-th, as DialogTeacher does."""
    from parlai.core.teachers import ParlAIDialogTeacher
    from parlai.utils import distributed
    from parlai.utils.data import DatatypeHelper

    setup_every_episode = ParlAIDialogTeacher._setup_data

    def _setup_data(self, path):
        setup_every_episode(self, path)
        workers = distributed.num_workers()
        if workers > 1 and not DatatypeHelper.is_training(self.opt["datatype"]):
            self.episodes = self.episodes[distributed.get_rank() :: workers]
            self.num_exs = sum(len(episode) for episode in self.episodes)

    ParlAIDialogTeacher._setup_data = _setup_data


def _eval_report_written_once():
    """eval_model's --report-filename is written by every worker of `parlai
    multiprocessing_eval` (its guard tests the function ``is_primary_worker``, always true,
    not its result), all at once into one file. Let the primary worker write it, atomically."""
    from parlai.scripts import eval_model
    from parlai.utils import distributed

    save_in_every_worker = eval_model._save_eval_stats

    def _save_eval_stats(opt, report):
        if distributed.is_primary_worker() and opt.get("report_filename"):
            from .storage import atomic_write

            atomic_write(_report_path(opt), lambda tmp: save_in_every_worker({**opt, "report_filename": tmp}, report))

    eval_model._save_eval_stats = _save_eval_stats


def _report_path(opt):
    name = opt["report_filename"]
    return opt["model_file"] + name if name.startswith(".") else name  # ParlAI's ".ext" shorthand


def multiprocess_train(rank, opt, port=61337, rank_offset=0, gpu=None, hostname="localhost"):
    """Entry point of `parlai multiprocessing_train` workers (see ``_worker``)."""
    return _worker("multiprocess_train", "JoinableTrainLoop", "train", rank, opt, port, rank_offset, gpu, hostname)


def multiprocess_eval(rank, opt, port=61337, rank_offset=0, gpu=None, hostname="localhost"):
    """Entry point of `parlai multiprocessing_eval` workers (see ``_worker``)."""
    return _worker("multiprocess_eval", "JoinableEvaluator", "eval_model", rank, opt, port, rank_offset, gpu, hostname)


def _worker(entry, loop_class, method, rank, opt, port, rank_offset, gpu, hostname):
    """ParlAI's worker function ``entry``, run as ``fsdp.<loop_class>(opt).<method>()``.

    Spawned workers import nothing of ours before ParlAI sets up torch.distributed, so the
    fixes above must be applied by the function they are started with. On CPU it is also
    ParlAI's function with one change: the loop is freed before the process group is
    destroyed. ParlAI frees it after, and the DistributedDataParallel reducer its agent holds
    then destroys the gloo group itself, which now and then deadlocks in ~ProcessGroupGloo
    (seen as a run that trained, evaluated and never exited).
    """
    apply()
    if torch.cuda.is_available():
        return _UNPATCHED_WORKERS[entry](rank, opt, port, rank_offset, gpu, hostname)
    from parlai.utils import distributed, fsdp

    init_method = f"tcp://{hostname}:{port}"
    with distributed.distributed_context(rank, opt, rank_offset, gpu, init_method=init_method) as opt:
        opt["multiprocessing"] = True
        loop = getattr(fsdp, loop_class)(opt)
        try:
            with fsdp.fsdp_join(loop):
                return getattr(loop, method)()
        except Exception:
            from parlai.utils import logging

            logging.critical(traceback.format_exc())
            logging.critical(f"Got the above exception on worker {rank + rank_offset}.")
            raise
        finally:
            del loop
            gc.collect()  # the agent and its model sit in reference cycles


def _workers_start_with_fixes():
    from parlai.scripts import multiprocessing_eval, multiprocessing_train

    for script, entry in ((multiprocessing_train, multiprocess_train), (multiprocessing_eval, multiprocess_eval)):
        _UNPATCHED_WORKERS[entry.__name__] = getattr(script, entry.__name__)
        setattr(script, entry.__name__, entry)


_UNPATCHED_WORKERS = {}


def _resumed_training_as_it_was():
    """Two things a resumed TrainLoop gets wrong, put right once it is built:

    - it sets opt['init_model'] to MODEL.checkpoint and keeps it, so the agent it builds for
      the final valid/test report loads that (older) checkpoint instead of the model file it
      has just saved (and the model file's own .opt names the checkpoint too): point
      init_model at what was given, or the model file;
    - it restores the epoch of its last validation but not its update, so with
      --validation-every-n-steps N it validates at once and then every N updates from there:
      the schedule moves, and a validation due at the last update before the step limit (set
      one past it, since ParlAI stops before a validation due at the limit) never comes.
      Restore that update from the last valid report, as the epoch is restored.
    """
    from parlai.scripts import train_model

    if getattr(train_model.TrainLoop.__init__, "parlai_poly", False):
        return
    original = train_model.TrainLoop.__init__

    def __init__(self, opt):
        given = opt.get("init_model")
        original(self, opt)
        resumed_from = self.opt.get("init_model")
        if resumed_from and resumed_from != given and resumed_from.endswith(".checkpoint"):
            self.opt["init_model"] = given or self.opt["model_file"]
        if self.valid_reports and "total_train_updates" in self.valid_reports[-1]:
            self._last_valid_steps = int(self.valid_reports[-1]["total_train_updates"])

    __init__.parlai_poly = True
    train_model.TrainLoop.__init__ = __init__


def _weight_decay_zero_honoured():
    """TorchAgent.init_optim passes --weight-decay to the optimizer only when it is truthy, so
    ``--weight-decay 0`` left torch's AdamW at its own default, 0.01: set the groups' decay to
    the option's value when it is 0 (a checkpoint's optimizer state, loaded in init_optim,
    carries its old value too)."""
    from parlai.core.torch_agent import TorchAgent

    if getattr(TorchAgent.init_optim, "parlai_poly", False):
        return
    original = TorchAgent.init_optim

    def init_optim(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.opt.get("weight_decay") == 0 and getattr(self, "optimizer", None) is not None:
            for group in self.optimizer.param_groups:
                group["weight_decay"] = 0.0
        return result

    init_optim.parlai_poly = True
    TorchAgent.init_optim = init_optim


FIXES = [
    _plateau_scheduler_without_verbose,
    _all_gather_list_on_cpu,
    _distributed_context_on_cpu,
    _join_device_on_cpu,
    _workers_start_with_fixes,
    _text_format_sharded_in_distributed_eval,
    _eval_report_written_once,
    _resumed_training_as_it_was,
    _weight_decay_zero_honoured,
]


@contextlib.contextmanager
def cpu_data_parallel():
    """TorchRankerAgent wraps its model in DistributedDataParallel with device_ids=[gpu],
    which torch refuses for a CPU model (it wants None); drop them while our agent is built."""
    ddp = torch.nn.parallel.DistributedDataParallel
    if torch.cuda.is_available() or not dist.is_initialized():
        yield
        return

    def cpu_ddp(module, device_ids=None, **kwargs):
        return ddp(module, **kwargs)

    torch.nn.parallel.DistributedDataParallel = cpu_ddp
    try:
        yield
    finally:
        torch.nn.parallel.DistributedDataParallel = ddp


def apply():
    """Apply every fix once; safe to call many times."""
    global _applied
    if _applied:
        return
    for fix in FIXES:
        fix()
    _applied = True
