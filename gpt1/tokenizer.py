"""Byte-level BPE tokenizer (the `tokenizers` library) saved as GPT-2-style vocab.json + merges.txt.

GPT-1's fine-tuning adds three tokens of its own (start, delimiter, extract); padding and
end-of-text complete the special tokens. Existing vocab/merges files load instead of a trained
vocabulary: byte-level ones as they are, and the original GPT's "</w>"-suffixed ones with that
suffix and a whitespace pre-tokenizer.
"""

import contextlib
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

START, DELIM, EXTRACT, PAD, EOT = "<|start|>", "<|delim|>", "<|extract|>", "<|pad|>", "<|endoftext|>"
SPECIAL_TOKENS = [EOT, PAD, START, DELIM, EXTRACT]


class GPT1Tokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.tok.add_special_tokens(SPECIAL_TOKENS)
        ids = {t: self.tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.eot_id, self.pad_id = ids[EOT], ids[PAD]
        self.start_id, self.delim_id, self.extract_id = ids[START], ids[DELIM], ids[EXTRACT]

    @classmethod
    def train(cls, files, vocab_size):
        if vocab_size < 256 + len(SPECIAL_TOKENS):  # the byte alphabet and the special tokens
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"tokenizer training file {f} not found")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train(files, trainer)
        return cls(tok)

    @classmethod
    def from_files(cls, vocab_file, merges_file):
        try:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{vocab_file} is not a JSON vocabulary: {e}") from None
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_file} is not a JSON vocabulary (token -> id)")
        # ids index the embedding and size the token files: a gap or a repeat would overrun or alias them
        if sorted(i if type(i) is int else -1 for i in vocab.values()) != list(range(len(vocab))):
            raise ValueError(f"{vocab_file}: the token ids must be the integers 0 to {len(vocab) - 1}, each once")
        original = any(t.endswith("</w>") for t in vocab)  # the original GPT's format
        # a byte-level BPE drops, without a word, the bytes its vocabulary lacks
        if not original and not set(pre_tokenizers.ByteLevel.alphabet()) <= vocab.keys():
            raise ValueError(f"{vocab_file} is neither a byte-level vocabulary (it lacks some of the 256 byte "
                             "symbols) nor one in the original GPT's format (</w> word ends)")
        try:
            if original:
                tok = Tokenizer(models.BPE.from_file(vocab_file, merges_file, end_of_word_suffix="</w>",
                                                     unk_token="<unk>" if "<unk>" in vocab else None))
                tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
                tok.decoder = decoders.BPEDecoder(suffix="</w>")
            else:
                tok = Tokenizer(models.BPE.from_file(vocab_file, merges_file))
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tok.decoder = decoders.ByteLevel()
        except Exception as e:  # noqa: BLE001 - the Rust library raises a bare Exception for a bad file
            raise ValueError(f"{vocab_file} and {merges_file} are not a BPE vocabulary and its merges: {e}") from None
        return cls(tok)

    @classmethod
    def from_dir(cls, path):
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        for f in (vocab, merges):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"tokenizer file {f} not found")
        return cls.from_files(vocab, merges)

    def save(self, path):
        """Write vocab.json (special tokens included) and merges.txt into the directory `path`."""
        os.makedirs(path, exist_ok=True)
        self.tok.model.save(str(path))
        vocab = self.tok.get_vocab(with_added_tokens=True)  # a hash map's order: one of its own in each process
        with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(dict(sorted(vocab.items(), key=lambda kv: kv[1])), f, ensure_ascii=False)

    def save_hf(self, path, model_max_length):
        """Also write tokenizer.json (the whole tokenizer, pre-tokenizer and decoder included) and a
        tokenizer_config.json naming it, so that transformers' AutoTokenizer.from_pretrained(path) encodes as this
        tokenizer does (HF's OpenAIGPTTokenizer reads "</w>"-suffixed files, not byte-level ones)."""
        self.save(path)
        self.tok.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "pad_token": PAD,
                       "additional_special_tokens": [START, DELIM, EXTRACT], "model_max_length": model_max_length},
                      f, indent=2)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def special_ids(self):
        return {"eot": self.eot_id, "pad": self.pad_id, "start": self.start_id, "delim": self.delim_id,
                "extract": self.extract_id}

    def encode(self, text):
        with _unicode_only([text]):
            return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        with _unicode_only(texts):
            return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)


@contextlib.contextmanager
def _unicode_only(texts):
    """The library's TypeError for a str that is not Unicode text (a lone surrogate: an undecodable byte of
    argv, say) as a ValueError that names it."""
    try:
        yield
    except TypeError:
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"cannot encode {t[max(0, e.start - 20):e.start + 20]!r}: a lone surrogate at "
                                 f"character {e.start} is not Unicode text (an undecodable byte?)") from None
            except AttributeError:  # not a str: the library's own error says so
                pass
        raise
