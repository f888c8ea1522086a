"""The backbone's tokenizer, wrapped as a ParlAI DictionaryAgent.

ParlAI's TorchAgent asks its dictionary for null/start/end tokens, ``txt2vec``/``vec2txt``
and token lookups; answering with the Hugging Face tokenizer means ``--text-truncate``,
``--label-truncate``, ``--history-size`` and ``--special-tok-lst`` work as usual, while ids
are exactly those the backbone was trained on. Start and end are the backbone's [CLS] and
[SEP] (or <s> and </s>), null is its padding token.
"""
import json
from collections import OrderedDict

import numpy as np
from parlai.core.dict import DictionaryAgent

from .backbone import load_tokenizer
from .storage import atomic_write_text

# Texts whose ids are remembered: ParlAI tokenizes every inline candidate of every example
# (266,620 on CCC test, 13,034 distinct), at about 0.1 ms each
TXT2VEC_MEMO_SIZE = 2**16


class HuggingFaceTokenizerDictionary(DictionaryAgent):
    """A prebuilt dictionary: nothing to count, the tokenizer defines the vocabulary."""

    def __init__(self, opt, shared=None):
        # DictionaryAgent.__init__ would build a word-count dictionary; we only need its opt.
        self.opt = opt
        if shared:
            self.tokenizer, self._memo = shared["tokenizer"], shared["memo"]
        else:
            self.tokenizer = load_tokenizer(opt.get("hf_model"))
            self._memo = OrderedDict()  # text -> ids, least recently used first (txt2vec)
        tok = self.tokenizer
        # txt2vec calls the Rust tokenizer itself: whole texts, as transformers' encode gives them
        tok.backend_tokenizer.no_truncation()
        tok.backend_tokenizer.no_padding()
        # ParlAI truncates after tokenizing (--text-truncate); without this, every long history
        # warns of "indexing errors" that never happen
        tok.model_max_length = int(1e30)
        self.null_token = tok.pad_token
        self.start_token = tok.cls_token or tok.bos_token
        self.end_token = tok.sep_token or tok.eos_token
        self.unk_token = tok.unk_token
        self.additional_special_tokens = []
        self._sync_vocab()

    def _sync_vocab(self):
        self._memo.clear()  # a new token can change how a text splits
        self.tok2ind = self.tokenizer.get_vocab()
        self.ind2tok = {i: t for t, i in self.tok2ind.items()}
        self.freq = {}
        self._unk_token_idx = self.tok2ind.get(self.unk_token)

    def is_prebuilt(self):
        return True

    def add_token(self, word):
        """New tokens (--special-tok-lst, person tokens) become tokenizer special tokens."""
        if word not in self.tok2ind:
            self.tokenizer.add_tokens([word], special_tokens=True)
            self._sync_vocab()

    def add_additional_special_tokens(self, tokens):
        self.additional_special_tokens = list(tokens)
        for tok in tokens:
            self.add_token(tok)

    def __setitem__(self, key, value):
        self.add_token(str(key))

    def __len__(self):
        return len(self.tokenizer)

    def txt2vec(self, text, vec_type=list):
        """The backbone's ids of ``text`` (no [CLS]/[SEP]: the agent adds them), as ``vec_type``
        (list, tuple, numpy array, or any type built from a list of ints)."""
        ids = self._ids(text)
        if vec_type is list:
            return list(ids)
        return np.array(ids, dtype=np.int64) if vec_type is np.ndarray else vec_type(ids)

    def _ids(self, text) -> tuple:
        """The ids of ``text`` from the Rust tokenizer itself (transformers' encode adds 0.1 ms
        of Python per call around it), remembered for the TXT2VEC_MEMO_SIZE latest texts."""
        ids = self._memo.get(text)
        if ids is None:
            ids = tuple(self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)
            self._memo[text] = ids
            if len(self._memo) > TXT2VEC_MEMO_SIZE:
                self._memo.popitem(last=False)
        else:
            self._memo.move_to_end(text)
        return ids

    def vec2txt(self, vec, delimiter=" "):
        """Text of ``vec``: the tokenizer's own decoding (word pieces joined as the backbone
        writes them); with another ``delimiter``, the tokens joined by it, as ParlAI does."""
        ids = vec.tolist() if hasattr(vec, "tolist") else list(vec)
        if delimiter != " ":
            return delimiter.join(self.tokenizer.convert_ids_to_tokens(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def tokenize(self, text, building=False):
        return self.tokenizer.tokenize(text)

    def act(self):
        return {}

    def share(self):
        return {"opt": self.opt, "class": type(self), "tokenizer": self.tokenizer, "memo": self._memo}

    def save(self, filename=None, append=False, sort=True):
        """A small JSON note of where the vocabulary comes from: the tokenizer is the backbone's
        (``sort`` has nothing to reorder: the ids are the tokenizer's, never counts)."""
        if append:
            raise ValueError("a Hugging Face tokenizer's dictionary cannot be appended to another file")
        filename = filename or self.opt.get("dict_file")
        note = {
            "type": "huggingface_tokenizer",
            "hf_model": self.opt.get("hf_model"),
            "vocab_size": len(self.tokenizer),
            "additional_special_tokens": self.additional_special_tokens,
        }
        atomic_write_text(filename, json.dumps(note, indent=2) + "\n")

    def load(self, filename):
        """The vocabulary is the backbone's; nothing to read from ``filename``."""

    def shutdown(self):
        pass
