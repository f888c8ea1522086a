"""The backbone's tokenizer as ParlAI's dictionary, and how texts are vectorized."""
import pytest

from helpers import make_agent
from parlai_poly.dictionary import HuggingFaceTokenizerDictionary


def test_dictionary_gives_the_backbones_ids(tiny_backbone):
    from transformers import AutoTokenizer

    agent = make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    text = "Hello there, General Kenobi!"
    assert [agent.START_IDX] + agent.dict.txt2vec(text) + [agent.END_IDX] == tokenizer(text)["input_ids"]
    assert agent.NULL_IDX == tokenizer.pad_token_id
    assert agent.dict.vec2txt(agent.dict.txt2vec("hello there")) == "hello there"
    long_text = "the quick brown fox jumps over the lazy dog " * 80  # past every length limit
    assert agent.dict.txt2vec(long_text) == tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert agent.dict.txt2vec(long_text) == agent.dict.txt2vec(long_text)
    agent.dict.tokenizer([long_text], truncation=True, max_length=8, padding="max_length")  # a caller's settings
    assert agent.dict.txt2vec(long_text) == tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert agent.dict.txt2vec("hello there", vec_type=tuple) == tuple(agent.dict.txt2vec("hello there"))


def test_a_token_added_later_splits_texts_remembered_before(tiny_backbone):
    """txt2vec remembers texts; adding a token (--special-tok-lst, person tokens) forgets them,
    in every copy of the dictionary that shares the tokenizer."""
    agent = make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone)
    copy = HuggingFaceTokenizerDictionary(agent.dict.opt, agent.dict.share())
    before = copy.txt2vec("__newtok__ hi")
    agent.dict.add_token("__newtok__")
    after = copy.txt2vec("__newtok__ hi")
    assert len(after) < len(before) and agent.dict.vec2txt(after[:1]) == "__newtok__"


def test_long_history_is_cut_from_the_left_and_keeps_cls_and_sep(tiny_backbone):
    agent = make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "--text-truncate", "8")
    agent.observe({"text": "one two three four five", "labels": ["ok"], "episode_done": False})
    agent.self_observe({"text": "ok"})
    obs = agent.observe({"text": "six seven eight nine ten", "labels": ["fine"], "episode_done": True})
    vec = obs["text_vec"].tolist()
    assert len(vec) == 8
    assert vec[0] == agent.START_IDX and vec[-1] == agent.END_IDX
    # the newest 6 tokens of "one two three four five / ok / six seven eight nine ten"
    assert agent.dict.vec2txt(vec[1:-1]) == "ok six seven eight nine ten"


LONG_LABEL = "one two three four five six seven eight nine ten"


def test_a_long_label_and_its_candidates_keep_their_sep(tiny_backbone):
    """Cut to --label-truncate - 2 word pieces, then wrapped: labels, inline and fixed candidates."""
    agent = make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "--label-truncate", "6")
    obs = agent.observe({"text": "hi", "eval_labels": [LONG_LABEL], "label_candidates": [LONG_LABEL, "ok"], "episode_done": True})
    fixed = agent.vectorize_fixed_candidates([LONG_LABEL])[0]
    for vec in (obs["eval_labels_vec"], obs["label_candidates_vecs"][0], fixed):
        vec = vec.tolist()
        assert vec[0] == agent.START_IDX and vec[-1] == agent.END_IDX and len(vec) == 6
        assert agent.dict.vec2txt(vec[1:-1]) == "one two three four"
    assert obs["label_truncate_rate"] and obs["label_original_length"] == 12
    assert obs["label_candidates_vecs"][1].tolist() == [agent.START_IDX] + agent.dict.txt2vec("ok") + [agent.END_IDX]


def test_a_model_file_saved_before_label_truncation_keeps_parlais_cut(tiny_backbone, tmp_path):
    """Its labels were cut after wrapping (losing [SEP]) in training: loaded, it cuts them so."""
    import json

    from helpers import reload_agent

    model_file = str(tmp_path / "model")
    make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "--label-truncate", "6").save(model_file)
    with open(model_file + ".opt") as f:
        opt = json.load(f)
    assert opt.pop("label_truncation") == "end-kept"
    with open(model_file + ".opt", "w") as f:
        json.dump(opt, f)
    agent = reload_agent(model_file)
    assert agent.opt["label_truncation"] == "parlai"
    vec = agent.vectorize_fixed_candidates([LONG_LABEL])[0].tolist()
    assert vec == ([agent.START_IDX] + agent.dict.txt2vec(LONG_LABEL))[:6]


def test_history_size_limits_the_turns_seen(tiny_backbone):
    agent = make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "--history-size", "1")
    agent.observe({"text": "first turn", "labels": ["a"], "episode_done": False})
    agent.self_observe({"text": "a"})
    obs = agent.observe({"text": "second turn", "labels": ["b"], "episode_done": True})
    assert agent.dict.vec2txt(obs["text_vec"][1:-1]) == "second turn"


def test_special_tokens_become_single_tokens(tiny_backbone):
    agent = make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "--special-tok-lst", "__persona__")
    ids = agent.dict.txt2vec("__persona__ likes dogs")
    assert len(agent.dict.tokenizer.convert_ids_to_tokens(ids[:1])) == 1
    assert agent.dict.vec2txt(ids[:1]) == "__persona__"
    assert agent.model.context_encoder.backbone.get_input_embeddings().num_embeddings == len(agent.dict)


def test_txt2vec_vec2txt_and_save_honour_their_arguments(tmp_path):
    import numpy as np

    dictionary = HuggingFaceTokenizerDictionary({"hf_model": None})
    ids = dictionary.txt2vec("hello there")
    assert dictionary.txt2vec("hello there", vec_type=tuple) == tuple(ids)
    assert dictionary.txt2vec("hello there", vec_type=np.ndarray).tolist() == ids
    assert dictionary.vec2txt(ids) == "hello there"
    assert dictionary.vec2txt(ids, delimiter="|") == "hello|there"
    with pytest.raises(ValueError, match="cannot be appended"):
        dictionary.save(str(tmp_path / "d"), append=True)


def test_the_memo_of_texts_stays_within_its_bounds(tiny_backbone, monkeypatch):
    """txt2vec remembers the latest texts up to TXT2VEC_MEMO_SIZE texts and TXT2VEC_MEMO_IDS ids;
    a forgotten text is tokenized again, to the same ids."""
    from parlai_poly import dictionary

    monkeypatch.setattr(dictionary, "TXT2VEC_MEMO_IDS", 10)
    agent = make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone)
    memo = agent.dict._token_ids
    texts = [f"one two three {word}" for word in ("red", "blue", "green", "pink")]  # 4 ids each
    first = [agent.dict.txt2vec(t) for t in texts]
    assert memo.ids_held <= 10 and list(memo.memo) == texts[-2:]
    assert [agent.dict.txt2vec(t) for t in texts] == first
