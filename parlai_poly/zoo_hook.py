"""Makes ``zoo:parlai_poly/<entry>/model`` work from the plain ``parlai`` command.

ParlAI 1.7.2 resolves a ``zoo:a/b/model`` path before it imports any agent, by importing the
module ``parlai.zoo.a.b`` and calling its ``download(datapath)``; it has no plugin hook for
this. Rather than write files into ParlAI's own package, the installed ``parlai_poly_zoo.pth``
(see setup.py) imports this module at interpreter start-up, and it adds one import finder:
``parlai.zoo.parlai_poly.<entry>`` becomes a module whose ``download`` installs our entry.
Nothing else is imported at start-up; the registry loads only when ParlAI asks for an entry.
"""
import importlib.abc
import importlib.util
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


def install() -> None:
    if not any(isinstance(f, _ZooEntryFinder) for f in sys.meta_path):
        sys.meta_path.append(_ZooEntryFinder())


install()
