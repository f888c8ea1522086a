"""The backbone's tokenizer, wrapped as a ParlAI DictionaryAgent.

ParlAI's TorchAgent asks its dictionary for null/start/end tokens, ``txt2vec``/``vec2txt``
and token lookups; answering with the Hugging Face tokenizer means ``--text-truncate``,
``--label-truncate``, ``--history-size`` and ``--special-tok-lst`` work as usual, while ids
are exactly those the backbone was trained on. Start and end are the backbone's [CLS] and
[SEP] (or <s> and </s>), null is its padding token.
"""
import contextlib
import json
from array import array
from collections import OrderedDict
from typing import Sequence

import numpy as np
from parlai.core.dict import DictionaryAgent
from tokenizers import Tokenizer

from .backbone import load_tokenizer
from .storage import atomic_write_text

# Texts whose ids are remembered: ParlAI tokenizes every inline candidate of every example
# (266,620 on CCC test, 13,034 distinct), at about 0.1 ms each, and long ones cost the most.
# At most this many texts, and this many ids in all (4 bytes each: 16 MiB)
TXT2VEC_MEMO_SIZE = 2**16
TXT2VEC_MEMO_IDS = 2**22


class TokenIds:
    """text -> ids (no special tokens) by the Rust tokenizer itself, as transformers' encode
    gives them without its ~0.1 ms of Python per call: a copy of its own, so truncation or
    padding that a caller sets on the transformers tokenizer never reaches it (transformers'
    encode resets both on every call); the latest texts remembered. Tokenizers without a
    Rust backend go through ``encode``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.memo: "OrderedDict[str, array]" = OrderedDict()  # least recently used first
        self.ids_held = 0  # ids in the memo, all texts together
        self.reset()

    def reset(self):
        """After a token is added: a new copy of the tokenizer, nothing remembered."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend
        self.memo.clear()
        self.ids_held = 0

    def __call__(self, text: str) -> Sequence[int]:
        ids = self.memo.get(text)
        if ids is not None:
            with contextlib.suppress(KeyError):  # another thread may have just evicted it
                self.memo.move_to_end(text)
            return ids
        if self.backend is None:
            ids = array("i", self.tokenizer.encode(text, add_special_tokens=False))
        else:
            ids = array("i", self.backend.encode(text, add_special_tokens=False).ids)
        self.memo[text] = ids
        self.ids_held += len(ids)
        while self.memo and (len(self.memo) > TXT2VEC_MEMO_SIZE or self.ids_held > TXT2VEC_MEMO_IDS):
            with contextlib.suppress(KeyError):  # another thread may be evicting too
                self.ids_held -= len(self.memo.popitem(last=False)[1])
        return ids


class HuggingFaceTokenizerDictionary(DictionaryAgent):
    """A prebuilt dictionary: nothing to count, the tokenizer defines the vocabulary."""

    def __init__(self, opt, shared=None):
        # DictionaryAgent.__init__ would build a word-count dictionary; we only need its opt.
        self.opt = opt
        if shared:
            self.tokenizer, self._token_ids = shared["tokenizer"], shared["token_ids"]
        else:
            self.tokenizer = load_tokenizer(opt.get("hf_model"))
            self._token_ids = TokenIds(self.tokenizer)  # txt2vec's
        tok = self.tokenizer
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
            self._token_ids.reset()  # the new token changes how texts split
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
        ids = self._token_ids(text)
        if vec_type is list:
            return ids.tolist()
        return np.array(ids, dtype=np.int64) if vec_type is np.ndarray else vec_type(ids.tolist())

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
        return {"opt": self.opt, "class": type(self), "tokenizer": self.tokenizer, "token_ids": self._token_ids}

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
