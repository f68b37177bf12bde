"""Where each supported family keeps its widths: which axis of which weight is a hidden channel, an MLP neuron or
an attention head, which modules to watch for importance, and which config fields hold the sizes."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Axis labels. "hidden": a residual-stream channel. "ffn": an MLP neuron of the layer. "heads" / "kv": query /
# key-value heads of the attention module, each head_dim rows wide. "qkv": GPT-2's fused c_attn output (q, k, v
# one after the other). "head_index": one entry per head (T5's relative attention bias). None: kept whole.
Axes = tuple[str | None, ...]


@dataclass(frozen=True)
class Sizes:
    """The widths of one model: residual channels, MLP neurons, query heads, key-value heads, head size."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class WidthSpec:
    """One family's layout. ``rules`` label each state-dict key's axes; their named groups ``layer`` (an MLP) and
    ``attn`` (an attention module) say whose neurons or heads an axis holds."""

    rules: list[tuple[re.Pattern, Axes]]
    down_module: re.Pattern  # its input is the MLP activation (group "layer")
    out_module: re.Pattern  # its input is the attention output, heads side by side (group "attn")
    encoder_root: str | None  # modules under it see the source's attention mask
    sizes: Callable[[Any, str | None], Sizes]  # (config, attention module or None) -> sizes
    set_sizes: Callable[[Any, Sizes], None]
    head_dim_is_free: bool  # False: hidden = heads x head_dim (GPT-2, BART)
    grouped_query: bool = False
    head_group: Callable[[str], str] = field(default=lambda attn: attn)  # modules that must keep the same heads


def _rules(*pairs: tuple[str, Axes]) -> list[tuple[re.Pattern, Axes]]:
    return [(re.compile(pattern), axes) for pattern, axes in pairs]


# BART --------------------------------------------------------------------------------------------------------------
_BART_LAYER = r"(?P<layer>model\.(?:encoder|decoder)\.layers\.\d+)"
_BART_ATTN = r"(?P<attn>model\.(?:encoder|decoder)\.layers\.\d+\.(?:self_attn|encoder_attn))"


def _bart_sizes(config: Any, attn: str | None) -> Sizes:
    stack = "encoder" if attn is not None and attn.startswith("model.encoder.") else "decoder"
    heads = getattr(config, f"{stack}_attention_heads")
    ffn = min(config.encoder_ffn_dim, config.decoder_ffn_dim)
    return Sizes(config.d_model, ffn, heads, heads, config.d_model // heads)


def _bart_set(config: Any, s: Sizes) -> None:
    config.d_model = s.hidden
    config.encoder_ffn_dim = config.decoder_ffn_dim = s.ffn
    config.encoder_attention_heads = config.decoder_attention_heads = s.heads


BART = WidthSpec(
    rules=_rules(
        (rf"^{_BART_ATTN}\.[qkv]_proj\.weight$", ("heads", "hidden")),
        (rf"^{_BART_ATTN}\.[qkv]_proj\.bias$", ("heads",)),
        (rf"^{_BART_ATTN}\.out_proj\.weight$", ("hidden", "heads")),
        (rf"^{_BART_ATTN}\.out_proj\.bias$", ("hidden",)),
        (rf"^{_BART_LAYER}\.fc1\.weight$", ("ffn", "hidden")),
        (rf"^{_BART_LAYER}\.fc1\.bias$", ("ffn",)),
        (rf"^{_BART_LAYER}\.fc2\.weight$", ("hidden", "ffn")),
        (r"(layer_norm|layernorm_embedding)\.(weight|bias)$|fc2\.bias$", ("hidden",)),
        (r"^(model\.shared|model\.(en|de)coder\.(embed_tokens|embed_positions)|lm_head)\.weight$", (None, "hidden")),
        (r"^final_logits_bias$", (None, None)),
    ),
    down_module=re.compile(rf"^{_BART_LAYER}\.fc2$"),
    out_module=re.compile(rf"^{_BART_ATTN}\.out_proj$"),
    encoder_root="model.encoder",
    sizes=_bart_sizes,
    set_sizes=_bart_set,
    head_dim_is_free=False,
)


# T5, mT5, Flan-T5 ----------------------------------------------------------------------------------------------------
_T5_ATTN = r"(?P<attn>(?:encoder|decoder)\.block\.\d+\.layer\.\d+\.(?:SelfAttention|EncDecAttention))"
_T5_MLP = r"(?P<layer>(?:encoder|decoder)\.block\.\d+\.layer\.\d+)\.DenseReluDense"


def _t5_sizes(config: Any, attn: str | None) -> Sizes:
    return Sizes(config.d_model, config.d_ff, config.num_heads, config.num_heads, config.d_kv)


def _t5_set(config: Any, s: Sizes) -> None:
    config.d_model, config.d_ff, config.num_heads = s.hidden, s.ffn, s.heads


def _t5_head_group(attn: str) -> str:
    # The relative attention bias lives in the first block and is added in every block of its stack: their
    # self-attention heads must stay the same heads, so the whole stack keeps one set.
    stack, _, _, _, _, kind = attn.split(".")
    return f"{stack}.SelfAttention" if kind == "SelfAttention" else attn


T5 = WidthSpec(
    rules=_rules(
        (rf"^{_T5_ATTN}\.[qkv]\.weight$", ("heads", "hidden")),
        (rf"^{_T5_ATTN}\.o\.weight$", ("hidden", "heads")),
        (rf"^{_T5_ATTN}\.relative_attention_bias\.weight$", (None, "head_index")),
        (rf"^{_T5_MLP}\.(wi|wi_0|wi_1)\.weight$", ("ffn", "hidden")),
        (rf"^{_T5_MLP}\.wo\.weight$", ("hidden", "ffn")),
        (r"layer_norm\.weight$", ("hidden",)),
        (r"^(shared|encoder\.embed_tokens|decoder\.embed_tokens|lm_head)\.weight$", (None, "hidden")),
    ),
    down_module=re.compile(rf"^{_T5_MLP}\.wo$"),
    out_module=re.compile(rf"^{_T5_ATTN}\.o$"),
    encoder_root="encoder",
    sizes=_t5_sizes,
    set_sizes=_t5_set,
    head_dim_is_free=True,
    head_group=_t5_head_group,
)


# GPT-2 ---------------------------------------------------------------------------------------------------------------
_GPT2_ATTN = r"(?P<attn>transformer\.h\.\d+\.attn)"
_GPT2_MLP = r"(?P<layer>transformer\.h\.\d+)\.mlp"


def _gpt2_sizes(config: Any, attn: str | None) -> Sizes:
    ffn = config.n_inner if config.n_inner is not None else 4 * config.n_embd
    return Sizes(config.n_embd, ffn, config.n_head, config.n_head, config.n_embd // config.n_head)


def _gpt2_set(config: Any, s: Sizes) -> None:
    config.n_embd, config.n_inner, config.n_head = s.hidden, s.ffn, s.heads


GPT2 = WidthSpec(
    # Conv1D weights are (in, out): the axes read the other way round from nn.Linear's.
    rules=_rules(
        (rf"^{_GPT2_ATTN}\.c_attn\.weight$", ("hidden", "qkv")),
        (rf"^{_GPT2_ATTN}\.c_attn\.bias$", ("qkv",)),
        (rf"^{_GPT2_ATTN}\.c_proj\.weight$", ("heads", "hidden")),
        (rf"^{_GPT2_MLP}\.c_fc\.weight$", ("hidden", "ffn")),
        (rf"^{_GPT2_MLP}\.c_fc\.bias$", ("ffn",)),
        (rf"^{_GPT2_MLP}\.c_proj\.weight$", ("ffn", "hidden")),
        (r"c_proj\.bias$|ln_(1|2|f)\.(weight|bias)$", ("hidden",)),
        (r"^(transformer\.wte|transformer\.wpe|lm_head)\.weight$", (None, "hidden")),
    ),
    down_module=re.compile(rf"^{_GPT2_MLP}\.c_proj$"),
    out_module=re.compile(rf"^{_GPT2_ATTN}\.c_proj$"),
    encoder_root=None,
    sizes=_gpt2_sizes,
    set_sizes=_gpt2_set,
    head_dim_is_free=False,
)


# Llama, Mistral, Qwen2 -----------------------------------------------------------------------------------------------
_LLAMA_ATTN = r"(?P<attn>model\.layers\.\d+\.self_attn)"
_LLAMA_MLP = r"(?P<layer>model\.layers\.\d+)\.mlp"


def _llama_sizes(config: Any, attn: str | None) -> Sizes:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return Sizes(config.hidden_size, config.intermediate_size, config.num_attention_heads, kv, head_dim)


def _llama_set(config: Any, s: Sizes) -> None:
    config.hidden_size, config.intermediate_size = s.hidden, s.ffn
    config.num_attention_heads, config.num_key_value_heads = s.heads, s.kv_heads
    config.head_dim = s.head_dim  # no longer hidden_size // heads once either is pruned


LLAMA = WidthSpec(
    rules=_rules(
        (rf"^{_LLAMA_ATTN}\.q_proj\.weight$", ("heads", "hidden")),
        (rf"^{_LLAMA_ATTN}\.q_proj\.bias$", ("heads",)),
        (rf"^{_LLAMA_ATTN}\.[kv]_proj\.weight$", ("kv", "hidden")),
        (rf"^{_LLAMA_ATTN}\.[kv]_proj\.bias$", ("kv",)),
        (rf"^{_LLAMA_ATTN}\.o_proj\.weight$", ("hidden", "heads")),
        (rf"^{_LLAMA_MLP}\.(gate_proj|up_proj)\.weight$", ("ffn", "hidden")),
        (rf"^{_LLAMA_MLP}\.(gate_proj|up_proj)\.bias$", ("ffn",)),
        (rf"^{_LLAMA_MLP}\.down_proj\.weight$", ("hidden", "ffn")),
        (r"(o_proj|down_proj)\.bias$|(layernorm|model\.norm)\.weight$", ("hidden",)),
        (r"^(model\.embed_tokens|lm_head)\.weight$", (None, "hidden")),
    ),
    down_module=re.compile(rf"^{_LLAMA_MLP}\.down_proj$"),
    out_module=re.compile(rf"^{_LLAMA_ATTN}\.o_proj$"),
    encoder_root=None,
    sizes=_llama_sizes,
    set_sizes=_llama_set,
    head_dim_is_free=True,
    grouped_query=True,
)

WIDTH_SPECS: dict[str, WidthSpec] = {
    "bart": BART,
    "t5": T5,
    "mt5": T5,
    "gpt2": GPT2,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
}
