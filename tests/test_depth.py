"""Block importance (hf_kd.student.depth), checked against the hidden states of teachers cut short by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bart, tiny_gpt2, tiny_llama, tiny_t5
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MT5Config,
    MT5ForConditionalGeneration,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_kd.student.depth import block_importance, layers_by_importance
from hf_kd.student.make import FAMILIES, make_student

VOCAB = 48


def _spread(model: nn.Module, std: float) -> nn.Module:
    """Wider random weights in the layers: a tiny model's residual branches at init barely move the hidden state
    (BI ~1e-5), too little for the comparisons below to mean anything."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and (".layers." in name or ".h." in name):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


TEACHERS = {
    "bart": lambda: _spread(tiny_bart(VOCAB, layers=3), 0.2),
    "t5": lambda: tiny_t5(VOCAB, num_layers=3),
    "mt5": lambda: tiny_t5(VOCAB, num_layers=3, model_cls=MT5ForConditionalGeneration, config_cls=MT5Config),
    "gpt2": lambda: _spread(tiny_gpt2(VOCAB, n_layer=3), 0.1),
    "llama": lambda: tiny_llama(VOCAB, 3, LlamaForCausalLM, LlamaConfig),
    "mistral": lambda: tiny_llama(VOCAB, 3, MistralForCausalLM, MistralConfig, sliding_window=3),
    "qwen2": lambda: tiny_llama(
        VOCAB, 3, Qwen2ForCausalLM, Qwen2Config, use_sliding_window=True, sliding_window=3, max_window_layers=1
    ),
}

# Written out here, not read from make.py: each stack's layer list, layer-count field and final norm (if any).
STACKS = {
    "bart": {
        "encoder": ("model.encoder.layers", "encoder_layers", None),
        "decoder": ("model.decoder.layers", "decoder_layers", None),
    },
    "t5": {
        "encoder": ("encoder.block", "num_layers", "encoder.final_layer_norm"),
        "decoder": ("decoder.block", "num_decoder_layers", "decoder.final_layer_norm"),
    },
    "gpt2": {"decoder": ("transformer.h", "n_layer", "transformer.ln_f")},
    "llama": {"decoder": ("model.layers", "num_hidden_layers", "model.norm")},
}
STACKS.update(mt5=STACKS["t5"], mistral=STACKS["llama"], qwen2=STACKS["llama"])


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _batch(model: nn.Module, lengths: list[int], target_lengths: list[int], seed: int = 1, labels: bool = True):
    """Right-padded rows of the given lengths; encoder-decoder: labels padded with -100, or decoder_input_ids
    with a decoder_attention_mask."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]
    batch = {"input_ids": _pad(rows, 0), "attention_mask": _pad([[1] * n for n in lengths], 0)}
    if model.config.is_encoder_decoder:
        targets = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in target_lengths]
        if labels:
            batch["labels"] = _pad(targets, -100)
        else:
            batch["decoder_input_ids"] = _pad(targets, 0)
            batch["decoder_attention_mask"] = _pad([[1] * n for n in target_lengths], 0)
    return batch


def _cut(model: nn.Module, family: str, stack: str, k: int) -> nn.Module:
    """A copy of the model whose ``stack`` keeps only its first ``k`` layers and has no final norm: its stack output
    is the hidden state leaving layer k - 1 (entering layer k)."""
    cut = copy.deepcopy(model)
    path, count_attribute, norm = STACKS[family][stack]
    parent_path, name = path.rsplit(".", 1)
    parent = cut.get_submodule(parent_path)
    setattr(parent, name, nn.ModuleList(list(getattr(parent, name))[:k]))
    setattr(cut.config, count_attribute, k)
    if getattr(cut.config, "layer_types", None) and not cut.config.is_encoder_decoder:
        cut.config.layer_types = cut.config.layer_types[:k]
    if norm is not None:
        norm_parent, norm_name = norm.rsplit(".", 1)
        setattr(cut.get_submodule(norm_parent), norm_name, nn.Identity())
    return cut


def _stack_output(model: nn.Module, stack: str, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        if not model.config.is_encoder_decoder:
            return model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        encoder = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        if stack == "encoder":
            return encoder
        decoder_ids = batch.get("decoder_input_ids")
        if decoder_ids is None:
            decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return model.get_decoder()(
            input_ids=decoder_ids,
            attention_mask=batch.get("decoder_attention_mask"),
            encoder_hidden_states=encoder,
            encoder_attention_mask=batch["attention_mask"],
        )[0]


def _reference(model: nn.Module, family: str, batches: list[dict]) -> dict[str, list[float]]:
    """BI from hidden states of cut-short copies, with cosines written out in float64 and pooled over batches."""
    model.eval()
    scores = {}
    for stack, (path, _, _) in STACKS[family].items():
        n = len(model.get_submodule(path))
        sums, tokens = [0.0] * n, 0
        for batch in batches:
            states = [_stack_output(_cut(model, family, stack, k).eval(), stack, batch).double() for k in range(n + 1)]
            if stack == "decoder" and "decoder_attention_mask" in batch:
                mask = batch["decoder_attention_mask"]
            elif stack == "decoder" and "labels" in batch:
                mask = batch["labels"].ne(-100)
            else:
                mask = batch["attention_mask"]
            mask = mask.bool()
            tokens += int(mask.sum())
            for i in range(n):
                a, b = states[i][mask], states[i + 1][mask]
                sums[i] += float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum())
        scores[stack] = [1 - s / tokens for s in sums]
    return scores


def test_every_family_is_covered():
    assert set(TEACHERS) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_scores_match_hidden_states_of_cut_short_copies(family):
    model = TEACHERS[family]()
    # Two batches of different padding; T5 and mT5 give the decoder its ids and mask, BART labels with -100.
    labels = family == "bart"
    batches = [
        _batch(model, [5, 9, 3], [4, 2, 6], seed=1, labels=labels),
        _batch(model, [7, 4], [3, 5], seed=2, labels=labels),
    ]
    scores = block_importance(model, batches)
    expected = _reference(model, family, batches)
    assert scores.keys() == expected.keys()
    for stack in expected:
        assert min(expected[stack]) > 1e-3, expected  # the layers do something: the comparison means something
        torch.testing.assert_close(torch.tensor(scores[stack]), torch.tensor(expected[stack]), rtol=1e-5, atol=1e-7)


def _make_identity(model: nn.Module, stack_path: str, layers: list[int]) -> None:
    """Zero each residual branch's output projection (attention, cross-attention and MLP; weights and biases):
    the layer then returns its input unchanged (pre-norm models)."""
    with torch.no_grad():
        for i in layers:
            for name, module in model.get_submodule(stack_path)[i].named_modules():
                if name.rsplit(".", 1)[-1] in {"c_proj", "o_proj", "down_proj", "o", "wo"}:
                    for p in module.parameters():
                        p.zero_()


IDENTITY_CASES = {
    # family: (layers made identities per stack, layers to keep per stack); 3 layers each. The default maps would
    # keep an identity (3 -> 2: [0, 2]; 3 -> 1: [0]).
    "gpt2": ({"decoder": [0]}, {"decoder": 2}),
    "llama": ({"decoder": [1]}, {"decoder": 2}),
    "t5": ({"encoder": [1], "decoder": [0, 2]}, {"encoder": 2, "decoder": 1}),
}


@pytest.mark.parametrize("family", sorted(IDENTITY_CASES))
def test_identity_layers_score_zero_and_are_dropped_first(family):
    model = TEACHERS[family]().eval()
    identities, counts = IDENTITY_CASES[family]
    for stack, layers in identities.items():
        _make_identity(model, STACKS[family][stack][0], layers)
    inputs = _batch(model, [6, 9], [5, 3], labels=False)
    scores = block_importance(model, [inputs])
    for stack, stack_scores in scores.items():
        for i, score in enumerate(stack_scores):
            if i in identities.get(stack, []):
                assert abs(score) < 1e-6, (stack, i, scores)
            else:
                assert score > 1e-3, (stack, i, scores)
    chosen = layers_by_importance(model, [inputs], counts)
    kept = {stack: [i for i in range(len(scores[stack])) if i not in identities.get(stack, [])] for stack in counts}
    assert chosen == kept
    # Copying only the kept layers changes nothing: the dropped ones did nothing.
    student = make_student(model, layer_map=chosen)
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
        got = student(**inputs, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_scores_do_not_depend_on_how_rows_are_batched(family):
    model = TEACHERS[family]()
    lengths, targets = [3, 4, 9, 11], [2, 3, 7, 5]
    whole = _batch(model, lengths, targets)
    halves = []
    for rows in (slice(0, 2), slice(2, 4)):  # the first half is much shorter: other padding, other token count
        half = {k: v[rows] for k, v in whole.items()}
        width = int(half["attention_mask"].sum(-1).max())
        half["input_ids"], half["attention_mask"] = half["input_ids"][:, :width], half["attention_mask"][:, :width]
        if "labels" in half:
            half["labels"] = half["labels"][:, : int(half["labels"].ne(-100).sum(-1).max())]
        halves.append({k: v.contiguous() for k, v in half.items()})
    assert halves[0]["input_ids"].shape[1] < whole["input_ids"].shape[1]
    one, two = block_importance(model, [whole]), block_importance(model, halves)
    for stack in one:
        torch.testing.assert_close(torch.tensor(two[stack]), torch.tensor(one[stack]), rtol=0, atol=1e-6)


def test_dropout_is_off_while_measuring_and_training_mode_comes_back():
    model = tiny_gpt2(VOCAB, n_layer=3, dropout=0.5)
    batch = _batch(model, [5, 8], [])
    model.eval()
    expected = block_importance(model, [batch])
    model.train()
    model.transformer.h[1].eval()  # a mixed state is restored module by module
    assert block_importance(model, [batch]) == expected
    assert model.training and model.transformer.h[0].training and not model.transformer.h[1].training
    assert not any(p.grad is not None for p in model.parameters())


def test_ties_keep_the_lower_index():
    model = TEACHERS["gpt2"]().eval()
    _make_identity(model, "transformer.h", [0, 1, 2])  # three zeros (exactly: the output is the input)
    assert layers_by_importance(model, [_batch(model, [4, 6], [])], {"decoder": 2}) == {"decoder": [0, 1]}


@pytest.mark.parametrize(
    ("family", "counts", "batches", "words"),
    [
        ("gpt2", {"decoder": 2}, [], "no calibration batches"),
        ("gpt2", {"decoder": 4}, None, "has 3 layers"),
        ("gpt2", {"decoder": 0}, None, "between 1 and 3"),
        ("gpt2", {"encoder": 1}, None, "Unknown stack(s) ['encoder']"),
        ("gpt2", {}, None, "number of layers to keep per stack"),
        ("gpt2", {"decoder": 1}, "padding", "every calibration position is padding"),
        ("bart", {"decoder": 1}, "no-decoder", "labels or decoder_input_ids"),
        ("bart", {"decoder": 1}, "tuple", "not a dict of tensors"),
    ],
)
def test_unusable_input_is_a_one_line_error(family, counts, batches, words):
    model = TEACHERS[family]()
    batch = _batch(model, [4, 6], [3, 2])
    if batches is None:
        batches = [batch]
    elif batches == "padding":
        batches = [{**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}]
    elif batches == "no-decoder":
        batches = [{k: v for k, v in batch.items() if k != "labels"}]
    elif batches == "tuple":
        batches = [tuple(batch.values())]
    with pytest.raises(ValueError) as err:
        layers_by_importance(model, batches, counts)
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_unsupported_architecture_is_refused():
    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
    )
    with pytest.raises(ValueError, match="Supported"):
        block_importance(model, [{"input_ids": torch.tensor([[4, 5, 6]])}])
