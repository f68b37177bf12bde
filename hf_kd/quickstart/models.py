"""The quickstart's models, built from configs with random weights: GPT-2 for ``lm``, BART or T5 for the
encoder-decoder tasks."""

from __future__ import annotations

from typing import Any

from hf_kd.quickstart.settings import Settings


def build_model(tokenizer: Any, layers: int, width: int, settings: Settings, seed: int, arch: str = "") -> Any:
    """A randomly initialised model: GPT-2 for lm; for the encoder-decoder tasks ``arch`` ("bart", "t5")."""
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(seed)
    if settings.is_seq2seq:
        return build_seq2seq(arch or "bart", tokenizer, layers, width, settings)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=settings.block_size,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 64),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Dropout only slows learning at these step counts: the training data are seen about twice.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def build_seq2seq(arch: str, tokenizer: Any, layers: int, width: int, settings: Settings) -> Any:
    """BART or T5 with ``layers`` encoder and ``layers`` decoder layers, heads of 64, feed-forward 4 x width.

    Both start the decoder with <pad> (T5's convention): the distillation trainer passes the student's decoder
    inputs to the teacher, so they must agree. No dropout, as for lm.
    """
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    heads = max(1, width // 64)
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }
    if arch == "t5":
        config = T5Config(
            d_model=width,
            d_kv=width // heads,
            d_ff=4 * width,
            num_layers=layers,
            num_decoder_layers=layers,
            num_heads=heads,
            dropout_rate=0.0,
            feed_forward_proj="relu",
            **ids,
        )
        model = T5ForConditionalGeneration(config)
    elif arch == "bart":
        config = BartConfig(
            d_model=width,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=4 * width,
            decoder_ffn_dim=4 * width,
            max_position_embeddings=max(settings.source_length, settings.target_length),
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            # BART's default 0.02 lets Adam flatten this small post-LN encoder within ~25 steps: its output becomes
            # the same vector for every input and the decoder never reads the source (measured, docs/quickstart.md).
            init_std=0.05,
            forced_eos_token_id=None,
            **ids,
        )
        model = BartForConditionalGeneration(config)
    else:
        raise ValueError(f"arch={arch!r}: use 't5' or 'bart'.")
    generation = model.generation_config
    generation.decoder_start_token_id, generation.forced_bos_token_id = tokenizer.pad_token_id, None
    generation.eos_token_id, generation.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return model


def architecture(model: Any) -> str:
    """``"BART 3+3 x 192"``: family, encoder + decoder layers (or layers), width."""
    c = model.config
    if c.model_type == "gpt2":
        return f"GPT-2 {c.n_layer} x {c.n_embd}"
    if c.model_type == "t5":
        return f"T5 {c.num_layers}+{c.num_decoder_layers} x {c.d_model}"
    return f"BART {c.encoder_layers}+{c.decoder_layers} x {c.d_model}"
