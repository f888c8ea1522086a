"""Our agents train and evaluate through ParlAI's own convai2, dstc7 and ubuntu teachers.

The data are the fixtures of parlai_poly.tasks.fixtures, in exactly the on-disk layout those
teachers read, so nothing is downloaded; the paper's R@1/N comes out with each dataset's N.
"""
import pytest
from parlai.scripts.train_model import TrainModel

from helpers import AGENTS, train_options
from parlai_poly.tasks.fixtures import FixtureSizes, write_fixture

# task, eval candidates per example (the paper's N), valid examples in the fixture

DATASETS = [("convai2", 20), ("dstc7", 100), ("ubuntu", 10)]
SIZES = FixtureSizes(train=160, valid=24, test=24)


# nothing here may reach the network; every test builds a task's data (slow, see pytest.ini)
pytestmark = [pytest.mark.usefixtures("no_downloads"), pytest.mark.slow]


@pytest.fixture(scope="module")
def datapath(tmp_path_factory):
    path = tmp_path_factory.mktemp("parlai_data")
    for task, _ in DATASETS:
        write_fixture(task, path, SIZES)
    return str(path)


@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("task, n_candidates", DATASETS)
def test_agent_trains_and_evaluates_on_parlai_teacher(agent, task, n_candidates, datapath, tmp_path, tiny_backbone):
    options = train_options(agent, tiny_backbone, {"task": task}, str(tmp_path / "model"), datapath=datapath, num_epochs=1)
    options["candidates"] = "batch"  # ubuntu train rows carry no candidates
    valid, test = TrainModel.main(**options)
    for report in (valid, test):
        assert int(report["exs"]) > 0
        assert 0.0 <= float(report[f"R@1/{n_candidates}"]) <= 1.0
        assert f"R@1/{n_candidates + 1}" not in report  # every example has exactly N candidates
