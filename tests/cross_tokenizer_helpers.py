"""Two tiny tokenizers that split text differently, trained here in a fraction of a second.

- ``byte_bpe_tokenizer()``: GPT-2 style byte-level BPE (ByteLevel pre-tokenizer and decoder, one
  ``<|endoftext|>`` token serving as BOS, EOS, UNK and padding);
- ``sentencepiece_tokenizer()``: T5 style Unigram with Metaspace (``"▁"`` for spaces, a prefix space on the
  first word), T5's normaliser (trailing spaces stripped, runs of spaces folded into one ``"▁"``) and ``</s>``
  appended to every sequence.
"""

from __future__ import annotations

import random
from functools import lru_cache

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS_WORDS = (
    "the a of to and in is it that for on with as was be by this are at from or an have not "
    "cat dog bird fish tree house car road river sky sun moon star red blue green big small "
    "runs jumps sees eats sleeps reads writes sings Hello world The A Paris London "
    "café naïve jalapeño über façade 日本 語 🙂 unbelievable believe unable able doable"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """``n`` sentences of 3-12 words from :data:`CORPUS_WORDS`, some ending in punctuation."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words = " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(3, 12)))
        sentences.append(words + rng.choice([".", "!", "?", ",", ""]))
    return sentences


@lru_cache(maxsize=1)
def byte_bpe_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer)
    eos = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)
    tok.name_or_path = "tiny-byte-bpe"
    return tok


@lru_cache(maxsize=1)
def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(corpus(), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", backend.token_to_id("</s>"))]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.name_or_path = "tiny-sentencepiece"
    return tok
