"""Tiny models and a locally built tokenizer: no test ever reaches the Hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

# The models here are tiny: one thread is faster than two fighting over small tensors, and steadier.
torch.set_num_threads(1)

from transformers import (  # noqa: E402
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

WORDS = (
    "the a of to and in is it that for on with as was be by this are at from or an have not "
    "cat dog bird fish tree house car road river sky sun moon star red blue green big small "
    "runs jumps sees eats sleeps reads writes sings"
).split()
SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]


def make_tokenizer(words: list[str] = WORDS, name: str = "tiny-words") -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ids 0-3 are <pad>, </s>, <unk>, <s>; then one id per word."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )
    tok.name_or_path = name
    return tok


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """One tokenizer per test module, for the modules' own module-scoped fixtures (saved teachers, data sets)."""
    return make_tokenizer()


def tiny_gpt2(vocab_size: int, seed: int = 0, n_layer: int = 2, n_embd: int = 32, dropout: float = 0.0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=3,
        eos_token_id=1,
        pad_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def tiny_t5(
    vocab_size: int,
    seed: int = 0,
    d_model: int = 32,
    num_layers: int = 2,
    dropout: float = 0.0,
    model_cls: type = T5ForConditionalGeneration,
    config_cls: type = T5Config,
    **overrides,
):
    """A tiny T5 (or, with ``model_cls``/``config_cls``, mT5); ``overrides`` replace any config field."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=dropout,
    )
    return model_cls(config_cls(**{**fields, **overrides}))


def tiny_llama(vocab_size: int, layers: int = 2, model_cls: type | None = None, config_cls: type | None = None,
               seed: int = 0, **overrides):  # fmt: skip
    """A tiny Llama-style causal LM (Llama, or Mistral/Qwen2 through ``model_cls``/``config_cls``): 32 wide, 4 query
    heads sharing 2 key-value heads; ``overrides`` replace any config field."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return (model_cls or LlamaForCausalLM)((config_cls or LlamaConfig)(**{**fields, **overrides}))


def tiny_bart(vocab_size: int, seed: int = 0, d_model: int = 32, layers: int = 2, dropout: float = 0.0):
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
        decoder_start_token_id=1,
        forced_eos_token_id=1,
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
    )
    return BartForConditionalGeneration(config)


def random_sentences(n: int, seed: int = 0, min_len: int = 3, max_len: int = 12) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (length,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out
