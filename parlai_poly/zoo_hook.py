"""Makes ``zoo:parlai_poly/<entry>/model`` work from the plain ``parlai`` command.

ParlAI 1.7.2 resolves a ``zoo:a/b/model`` path before it imports any agent, by importing the
module ``parlai.zoo.a.b`` and calling its ``download(datapath)``; it has no plugin hook for
this. Rather than write files into ParlAI's own package, the installed ``parlai_poly_zoo.pth``
(see setup.py) imports this module at interpreter start-up, and it adds one import finder:
``parlai.zoo.parlai_poly.<entry>`` becomes a module whose ``download`` installs our entry.
Nothing else is imported at start-up; the registry loads only when ParlAI asks for an entry.

The same start-up hook keeps ParlAI from unpickling options files. ParlAI's ``Opt.load`` falls
back to ``pickle.load`` for a ``.opt`` that is not UTF-8, and ``parlai eval_model -mf X`` reads
``X.opt`` before any plugin code runs, so a crafted file would run code. A second finder
watches for ``parlai.core.opt`` and, once ParlAI has loaded it, makes ``Opt.load`` read JSON
only: anything else is refused with a sentence naming the file. It also watches
``parlai.core.agents``: a model file whose ``.opt`` is missing gets a sentence naming the
file and the agent that wrote it instead of ParlAI's "Need to set `model`" traceback.

Two ParlAI commands never import our agents before they act on the file they are given, so
they are patched here too, when ``parlai`` imports them: ``parlai vacuum`` would unpickle a
model file with ``torch.load`` and rewrite it, and refuses a safetensors file before touching
it (ours hold no optimizer state to strip); ``parlai torchscript`` scripts ParlAI's generator
search around the model and refuses our rankers, naming the ONNX export instead.
"""
import importlib.abc
import importlib.util
import os
import sys

ZOO_PREFIX = "parlai_poly"  # zoo:parlai_poly/<entry>/model
MODULE = "parlai.zoo." + ZOO_PREFIX


class _ZooEntryLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # a plain module

    def exec_module(self, module):
        if module.__name__ == MODULE:
            module.__path__ = []  # a package, so that parlai.zoo.parlai_poly.<entry> imports
            return
        entry = module.__name__[len(MODULE) + 1 :]

        def download(datapath):
            from parlai_poly.errors import report_bad_input_on_exit
            from parlai_poly.zoo import download as download_entry

            report_bad_input_on_exit()
            return download_entry(entry, datapath)

        module.download = download


class _ZooEntryFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == MODULE or fullname.startswith(MODULE + "."):
            return importlib.util.spec_from_loader(fullname, _ZooEntryLoader(), is_package=fullname == MODULE)
        return None


OPT_MODULE = "parlai.core.opt"


def json_only(load):
    """ParlAI's Opt.load, refusing a file that is not JSON instead of unpickling it."""

    def load_json(cls, optfile):
        import json

        from parlai_poly.errors import ModelFileError, report_bad_input_on_exit

        try:
            with open(optfile, "rb") as f:
                json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            report_bad_input_on_exit()
            raise ModelFileError(
                f"{optfile}: not a JSON options file ({e.__class__.__name__}). ParlAI would try to "
                "unpickle it, which can run any code; parlai-poly never unpickles files. Use a "
                "model file saved as JSON options (any ParlAI >= 1.0 writes them), or re-save it "
                "with a trusted ParlAI install."
            ) from None
        except OSError:
            pass  # not a local file (ParlAI's PathManager may read it): ParlAI's own load decides
        return load.__func__(cls, optfile)

    load_json.parlai_poly = True
    return classmethod(load_json)


def _patch_opt(module):
    if not getattr(module.Opt.load, "parlai_poly", False):
        module.Opt.load = json_only(module.Opt.__dict__["load"])


def _patch_agents(module):
    create_agent = module.create_agent
    if getattr(create_agent, "parlai_poly", False):
        return

    def create_agent_with_opt_checked(opt, requireModelExists=False):
        model_file = opt.get("model_file")
        if not opt.get("model") and model_file and os.path.isfile(model_file) and not os.path.isfile(model_file + ".opt"):
            from parlai_poly.errors import ModelFileError

            agent = written_by(model_file)
            hint = f"pass -m parlai_poly.agents:{agent} (the agent that wrote it)" if agent else "pass -m AGENT"
            _refuse(ModelFileError(
                f"{model_file}.opt is missing: it holds the options the model was trained with. "
                f"Restore it beside {model_file}, or {hint} with the same architecture options."
            ))
        return create_agent(opt, requireModelExists=requireModelExists)

    create_agent_with_opt_checked.parlai_poly = True
    module.create_agent = create_agent_with_opt_checked


def written_by(model_file):
    """The parlai-poly agent named in a safetensors file's metadata; None for any other file."""
    from parlai_poly.model_file import is_safetensors, read_metadata

    if not model_file or not os.path.isfile(model_file) or not is_safetensors(model_file):
        return None
    return read_metadata(model_file).get("agent")


def _refuse(error):
    from parlai_poly.errors import report_bad_input_on_exit

    report_bad_input_on_exit()
    raise error


def _patch_vacuum(module):
    run = module.Vacuum.run
    if getattr(run, "parlai_poly", False):
        return

    def run_unless_safetensors(self):
        from parlai_poly.model_file import TRAINSTATE_SUFFIX, is_safetensors

        path = self.opt.get("path")
        if path and os.path.isfile(path) and is_safetensors(path):
            from parlai_poly.errors import ModelFileError, report_bad_input_on_exit

            report_bad_input_on_exit()  # reading a damaged file's metadata is refused in a sentence too
            agent = written_by(path)
            whose = f"a parlai-poly model file (the '{agent}' agent's weights)" if agent else "a safetensors file"
            raise ModelFileError(
                f"parlai vacuum: {path} is {whose}, not a pickled ParlAI checkpoint; vacuum would "
                "unpickle it with torch.load and rewrite it, so it was left untouched. It needs no "
                "vacuuming: parlai-poly model files hold only the weights, and the optimizer state "
                f"that vacuum strips is in {path}{TRAINSTATE_SUFFIX}, which only resuming training "
                "reads. To ship the model, leave that file out."
            )
        return run(self)

    run_unless_safetensors.parlai_poly = True
    module.Vacuum.run = run_unless_safetensors


GREEDY_SEARCH = "parlai.torchscript.modules:TorchScriptGreedySearch"  # torchscript's default


def _patch_torchscript(module):
    export_model = module.export_model
    if getattr(export_model, "parlai_poly", False):
        return

    def export_unless_ranker(opt):
        model = opt.get("model") or ""
        agent = written_by(opt.get("model_file")) or (model.split(":")[-1] if model.startswith("parlai_poly") else None)
        if agent and opt.get("script_module") in (None, "", GREEDY_SEARCH):
            from parlai_poly.errors import ParlaiPolyError

            model_file = opt.get("model_file")
            instead = (
                f"Export it to ONNX with `python -m parlai_poly.export onnx {model_file} OUT_DIR` instead."
                if agent != "cross"  # the export has no encoder to take from a cross-encoder
                else "A cross-encoder has no export; rank with it from Python (parlai_poly.Ranker)."
            )
            _refuse(ParlaiPolyError(
                f"parlai torchscript: {model_file} is a parlai-poly ranking model "
                f"(parlai_poly.agents:{agent}), and ParlAI's torchscript only exports generator "
                "models (TorchScriptGreedySearch decodes replies token by token; a ranker scores "
                f"candidates). Nothing was written. {instead}"
            ))
        return export_model(opt)

    export_unless_ranker.parlai_poly = True
    module.export_model = export_unless_ranker


PATCHES = {
    OPT_MODULE: _patch_opt,
    "parlai.core.agents": _patch_agents,
    "parlai.scripts.vacuum": _patch_vacuum,
    "parlai.scripts.torchscript": _patch_torchscript,
}


class _PatchingLoader(importlib.abc.Loader):
    """Runs a module's own loader, then our patch of it."""

    def __init__(self, loader, patch):
        self.loader = loader
        self.patch = patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)


class _ParlaiPatchFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _PatchingLoader(spec.loader, PATCHES[fullname])
                return spec
        return None


def install() -> None:
    if not any(isinstance(f, _ZooEntryFinder) for f in sys.meta_path):
        sys.meta_path.append(_ZooEntryFinder())
    if not any(isinstance(f, _ParlaiPatchFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ParlaiPatchFinder())


install()
