"""What parlai-poly promises under bad or hostile input, one test per promise.

Folders it never deletes: only what it created (by its own marker) is ever replaced.
Files it never unpickles: a pickled options file is refused, even from the plain `parlai`.
"""
import os
import pickle
import subprocess
import sys

import pytest

from parlai_poly.errors import ParlaiPolyError, ZooError
from parlai_poly.tasks.ccc import build as ccc_build
from parlai_poly.tasks.ccc.__main__ import main as fixed_candidates_cli
from parlai_poly.zoo import recipe


# ---- folders it never deletes -------------------------------------------------------------
@pytest.mark.parametrize("marker", [None, "2020-01-01\nold-version"])
def test_a_folder_holding_files_of_the_user_is_never_replaced(tmp_path, marker, capsys):
    folder = tmp_path / "ccc"
    (folder / "notes").mkdir(parents=True)
    (folder / "my_results.txt").write_text("keep me")
    (folder / "notes" / "n.txt").write_text("and me")
    if marker:
        (folder / ".built").write_text(marker)
    with pytest.raises(ParlaiPolyError, match=r"ccc holds files that the CCC task did not write \(my_results.txt, notes\)"):
        ccc_build.build(str(tmp_path))
    assert (folder / "my_results.txt").read_text() == "keep me"
    assert (folder / "notes" / "n.txt").read_text() == "and me"
    assert sorted(os.listdir(tmp_path)) == ["ccc"]  # no staging folder left either
    # from the command line: the sentence, a failing status, no traceback
    with pytest.raises(SystemExit) as exit_info:
        fixed_candidates_cli(["--datapath", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "did not write (my_results.txt, notes)" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["entry", "entry.old"])
def test_an_install_never_replaces_a_folder_we_did_not_install(tmp_path, where):
    staged = tmp_path / "staging" / "entry"
    staged.mkdir(parents=True)
    (staged / "model").write_text("new weights")
    target = tmp_path / "models" / "entry"
    (tmp_path / "models" / where).mkdir(parents=True)
    (tmp_path / "models" / where / "mine.txt").write_text("a user's file")
    with pytest.raises(ZooError, match=f"{where} holds files parlai-poly did not install"):
        recipe.install_entry(str(staged), str(target))
    assert (tmp_path / "models" / where / "mine.txt").read_text() == "a user's file"
    assert (staged / "model").read_text() == "new weights"  # nothing moved either


def test_an_install_replaces_our_own_earlier_install(tmp_path):
    target = tmp_path / "models" / "entry"
    for folder, content in ((target, "old weights"), (tmp_path / "new", "new weights")):
        folder.mkdir(parents=True)
        (folder / "model").write_text(content)
        (folder / recipe.MARKER).write_text("{}")
    recipe.install_entry(str(tmp_path / "new"), str(target))
    assert (target / "model").read_text() == "new weights"
    assert not (tmp_path / "models" / "entry.old").exists()


# ---- files it never unpickles ---------------------------------------------------------------
class RunsCode:
    """Unpickling this runs a command: what a crafted .opt file can do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_pickled_options_file_is_refused_by_plain_parlai(tmp_path):
    marker = tmp_path / "code_ran"
    (tmp_path / "model.opt").write_bytes(pickle.dumps({"model": RunsCode(str(marker))}))
    (tmp_path / "model").write_bytes(b"weights")
    pickle.loads((tmp_path / "model.opt").read_bytes())  # the file is what it claims: it runs code
    assert marker.exists()
    marker.unlink()
    parlai = os.path.join(os.path.dirname(sys.executable), "parlai")
    for command in ("eval_model", "interactive"):
        done = subprocess.run(
            [parlai, command, "-mf", str(tmp_path / "model"), "-t", "integration_tests"],
            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        )
        assert done.returncode != 0
        assert f"{tmp_path / 'model.opt'}: not a JSON options file" in done.stderr
        assert "never unpickles" in done.stderr and "Traceback" not in done.stderr
        assert not marker.exists()


def test_options_files_load_as_json_only_in_process(tmp_path):
    from parlai.core.opt import Opt

    (tmp_path / "good.opt").write_text('{"model": "parlai_poly.agents:bi"}')
    assert Opt.load(str(tmp_path / "good.opt"))["model"] == "parlai_poly.agents:bi"
    (tmp_path / "broken.opt").write_text("{not json")
    with pytest.raises(ParlaiPolyError, match="broken.opt: not a JSON options file"):
        Opt.load(str(tmp_path / "broken.opt"))


# ---- candidate files that would change results silently ---------------------------------------
def test_blank_and_repeated_candidate_lines_are_skipped_by_line(tmp_path, parlai_warnings):
    from parlai_poly.candidate_file import read_candidate_file

    path = tmp_path / "cands.txt"
    path.write_text("it is red\n\n   \nit is blue\nit is red\nit is green\n")
    assert read_candidate_file(str(path)) == ["it is red", "it is blue", "it is green"]
    assert any("skipped 2 line(s) blank" in w and "line 2, 3" in w for w in parlai_warnings)
    assert any("skipped 1 line(s) repeating an earlier line" in w and "line 5" in w for w in parlai_warnings)


def test_fixed_candidates_count_each_candidate_once_and_never_reply_blank(tmp_path, tiny_backbone):
    from helpers import make_agent

    path = tmp_path / "cands.txt"
    path.write_text("\n".join(["", "it is red", "it is blue", "it is red", " ", "it is green"]) + "\n")
    agent = make_agent(
        "-m", "parlai_poly.agents:bi", "--hf-model", str(tiny_backbone), "--eval-candidates", "fixed",
        "--fixed-candidates-path", str(path), "-dt", "valid",
    )
    assert agent.fixed_candidates == ["it is red", "it is blue", "it is green"]
    agent.observe({"text": "today the cat", "eval_labels": ["it is blue"], "episode_done": True})
    reply = agent.act()
    assert reply["text"] and sorted(reply["text_candidates"]) == sorted(agent.fixed_candidates)
    assert "R@1/3" in reply["metrics"] and "R@1/5" not in reply["metrics"]


# ---- states it never mixes --------------------------------------------------------------------
@pytest.mark.slow
def test_a_model_file_is_never_run_or_overwritten_as_another_agent(tmp_path, tiny_backbone, synthetic_task):
    import hashlib

    from parlai.scripts.eval_model import EvalModel
    from parlai.scripts.train_model import TrainModel

    from helpers import train_options
    from parlai_poly.errors import ModelFileError

    bi_file = str(tmp_path / "bi")
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, bi_file, num_epochs=1))
    digest = hashlib.sha256(open(bi_file, "rb").read()).hexdigest()
    refusal = "a bi model file, but -m parlai_poly.agents:cross builds a cross model"
    with pytest.raises(ModelFileError, match=refusal):
        EvalModel.main(**dict(synthetic_task, model_file=bi_file, model="parlai_poly.agents:cross", encode_candidate_vecs=False))
    with pytest.raises(ModelFileError, match=refusal):
        TrainModel.main(**train_options("cross", tiny_backbone, synthetic_task, bi_file, num_epochs=1))
    assert hashlib.sha256(open(bi_file, "rb").read()).hexdigest() == digest
    # --init-model is where converting belongs: a new cross-encoder file starts from it
    cross_file = str(tmp_path / "cross")
    TrainModel.main(**train_options("cross", tiny_backbone, synthetic_task, cross_file, num_epochs=1, init_model=bi_file))
    assert os.path.isfile(cross_file)


@pytest.mark.slow
def test_weights_and_train_state_of_different_saves_are_never_resumed_together(tmp_path, tiny_backbone, synthetic_task):
    import shutil

    from parlai.scripts.train_model import TrainModel

    from helpers import train_options
    from parlai_poly.errors import ModelFileError

    model_file = str(tmp_path / "model")
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, model_file, num_epochs=1))
    shutil.copy(model_file + ".trainstate", tmp_path / "first.trainstate")
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, model_file, num_epochs=2))
    # a save killed after the train state and before the weights: the first save's state
    # beside the second's weights, as a kill between the two writes would leave them
    shutil.copy(tmp_path / "first.trainstate", model_file + ".trainstate")
    with pytest.raises(ModelFileError, match=r"model.trainstate and .*model come from different saves"):
        TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, model_file, num_epochs=3))


@pytest.mark.slow
def test_the_final_report_of_a_resumed_run_describes_the_saved_model(tmp_path, tiny_backbone, synthetic_task):
    from parlai.scripts.train_model import TrainLoop, setup_args

    from helpers import train_options

    model_file = str(tmp_path / "model")
    options = train_options("bi", tiny_backbone, synthetic_task, model_file, max_train_steps=5, save_every_n_secs=1e-9)
    TrainLoop(setup_args().parse_kwargs(**options)).train()  # leaves model and model.checkpoint
    assert os.path.isfile(model_file + ".checkpoint")
    options.update(max_train_steps=30, save_every_n_secs=1e9)  # resumes from the checkpoint
    loop = TrainLoop(setup_args().parse_kwargs(**options))
    loop.train()
    # the agent of the final report is the model file saved at the end, not the checkpoint
    final = loop.agent
    assert not final.opt["init_model"].endswith(".checkpoint")
    assert final._number_training_updates == 30  # the checkpoint it resumed from had 5


@pytest.mark.slow
def test_a_resumed_run_validates_on_its_schedule(tmp_path, tiny_backbone, synthetic_task):
    """--validation-every-n-steps 4, stopped after 6 updates and resumed to a limit of 13: the
    validations fall at 4, 8 and 12 (ParlAI alone validates as soon as it resumes, then every 4
    from there: here 4, 6 and 10, and none at 12)."""
    from parlai.scripts.train_model import TrainLoop, setup_args

    from helpers import train_options

    model_file = str(tmp_path / "model")
    options = train_options(
        "bi", tiny_backbone, synthetic_task, model_file, max_train_steps=6, save_every_n_secs=1e-9,
        validation_every_n_steps=4, validation_max_exs=16,
    )
    TrainLoop(setup_args().parse_kwargs(**options)).train()
    options.update(max_train_steps=13)
    loop = TrainLoop(setup_args().parse_kwargs(**options))
    loop.train()
    assert [int(r["total_train_updates"]) for r in loop.valid_reports] == [4, 8, 12]


# ---- a sentence, not a traceback ----------------------------------------------------------------
@pytest.fixture(scope="module")
def small_bi(tmp_path_factory, tiny_backbone, synthetic_task):
    from parlai.scripts.train_model import TrainModel

    from helpers import train_options

    model_file = str(tmp_path_factory.mktemp("small_bi") / "model")
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, model_file, num_epochs=1))
    return model_file


def parlai_eval(model_file, synthetic_task):
    parlai = os.path.join(os.path.dirname(sys.executable), "parlai")
    task = ["-t", "fromfile:parlaiformat", "--fromfile-datapath", synthetic_task["fromfile_datapath"], "--fromfile-datatype-extension", "true"]
    return subprocess.run([parlai, "eval_model", "-mf", model_file] + task, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("cut_weights", "model: damaged or cut short"),
        ("cut_trainstate", "model.trainstate: damaged or cut short"),
        ("no_opt", "model.opt is missing: it holds the options the model was trained with. Restore it beside"),
    ],
)
@pytest.mark.slow
def test_damaged_model_files_get_a_sentence(small_bi, synthetic_task, tmp_path, damage, message):
    import shutil

    for suffix in ("", ".opt", ".dict", ".trainstate"):
        shutil.copy(small_bi + suffix, tmp_path / f"model{suffix}")
    model_file = str(tmp_path / "model")
    if damage == "no_opt":
        os.remove(model_file + ".opt")
    else:
        path = model_file + ("" if damage == "cut_weights" else ".trainstate")
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    done = parlai_eval(model_file, synthetic_task)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
    if damage == "no_opt":
        assert "-m parlai_poly.agents:bi (the agent that wrote it)" in done.stderr


def test_an_option_that_would_be_ignored_is_refused_by_name(tiny_backbone):
    from helpers import make_agent

    with pytest.raises(ParlaiPolyError, match="--reduction-type max with --cross-head segment-cosine"):
        make_agent("-m", "parlai_poly.agents:cross", "--hf-model", str(tiny_backbone),
                   "--cross-head", "segment-cosine", "--reduction-type", "max")


def test_a_killed_save_leaves_no_temporary_behind_the_next_one(tmp_path):
    from parlai_poly.storage import atomic_write_text

    target = tmp_path / "model.opt"
    killed = tmp_path / "model.opt.k3x_9abc.tmp"  # what mkstemp named a write that was killed
    killed.write_text("")
    recent = tmp_path / "model.opt.zz9_8xyz.tmp"  # maybe another writer's, still going
    recent.write_text("")
    mine = tmp_path / "model.opt.notes.tmp"  # not a name we make
    mine.write_text("keep")
    old = os.path.getmtime(killed) - 7200
    os.utime(killed, (old, old))
    os.utime(mine, (old, old))
    atomic_write_text(str(target), "{}")
    assert target.read_text() == "{}"
    assert not killed.exists() and recent.exists() and mine.read_text() == "keep"
