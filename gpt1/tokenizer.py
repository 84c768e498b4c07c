"""Byte-level BPE tokenizer (the `tokenizers` library) saved as GPT-2-style vocab.json + merges.txt.

GPT-1's fine-tuning adds three tokens of its own (start, delimiter, extract); padding and
end-of-text complete the special tokens. Existing vocab/merges files load instead of a trained
vocabulary: byte-level ones as they are, and the original GPT's "</w>"-suffixed ones with that
suffix and a whitespace pre-tokenizer.
"""

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
        if any(t.endswith("</w>") for t in vocab):  # the original GPT's format
            tok = Tokenizer(models.BPE.from_file(vocab_file, merges_file, end_of_word_suffix="</w>",
                                                 unk_token="<unk>" if "<unk>" in vocab else None))
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            tok.decoder = decoders.BPEDecoder(suffix="</w>")
        else:
            tok = Tokenizer(models.BPE.from_file(vocab_file, merges_file))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
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
        with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.tok.get_vocab(with_added_tokens=True), f, ensure_ascii=False)

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
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)
