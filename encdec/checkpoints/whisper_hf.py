"""Hugging Face Whisper checkpoints (``WhisperForConditionalGeneration``) -> the encdec tree.

The names and layouts join :func:`encdec.checkpoints.hf.tensor_specs`, so ``load_params`` reads
Whisper like every other family. See ``encdec.models.whisper`` for the encoder's extra tensors.
"""

from __future__ import annotations

from encdec.checkpoints.hf import TensorSpec, as_is, attention_specs, linear_specs, norm_specs
from encdec.config import ModelConfig


def _conv(x):
    return x.transpose(2, 1, 0)


def whisper_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of a Whisper checkpoint by its HF name (without the ``model.`` prefix)."""
    specs: dict[str, TensorSpec] = {}
    V, D, C = cfg.vocab_size, cfg.d_model, cfg.num_mel_bins
    head_alias = ("proj_out.weight",) if cfg.tie_word_embeddings else ()
    specs["decoder.embed_tokens.weight"] = TensorSpec(("shared", "embedding_VD"), (V, D), as_is, head_alias)
    if not cfg.tie_word_embeddings:
        specs["proj_out.weight"] = TensorSpec(("lm_head", "w"), (V, D), lambda x: x.T)
    for name, c_in in (("conv1", C), ("conv2", D)):
        specs[f"encoder.{name}.weight"] = TensorSpec(("encoder", name, "w"), (D, c_in, 3), _conv)
        specs[f"encoder.{name}.bias"] = TensorSpec(("encoder", name, "b"), (D,), as_is)
    specs["encoder.embed_positions.weight"] = TensorSpec(
        ("encoder", "pos_embedding_KD"), (cfg.audio_positions, D), as_is
    )
    specs["decoder.embed_positions.weight"] = TensorSpec(
        ("decoder", "pos_embedding_KD"), (cfg.max_positions, D), as_is
    )
    qkvo = ("q_proj", "k_proj", "v_proj", "out_proj")
    for stack, n_layers, heads, ffn_dim in (
        ("encoder", cfg.encoder_layers, cfg.encoder_heads, cfg.encoder_ffn_dim),
        ("decoder", cfg.decoder_layers, cfg.decoder_heads, cfg.decoder_ffn_dim),
    ):
        norm_specs(specs, f"{stack}.layer_norm", (stack, "final_norm"), cfg)
        for i in range(n_layers):
            hf, path = f"{stack}.layers.{i}", (stack, "layers", i)
            blocks = [("self_attn", "attn")] + (
                [("encoder_attn", "cross_attn")] if stack == "decoder" else []
            )
            for hf_block, ours in blocks:
                attention_specs(specs, f"{hf}.{hf_block}", (*path, ours), cfg, heads, True, qkvo)
                del specs[f"{hf}.{hf_block}.k_proj.bias"]  # Whisper's keys have no bias
                norm_specs(specs, f"{hf}.{hf_block}_layer_norm", (*path, f"{ours}_norm"), cfg)
            linear_specs(specs, f"{hf}.fc1", (*path, "ffn", "wi"), D, ffn_dim, True)
            linear_specs(specs, f"{hf}.fc2", (*path, "ffn", "wo"), ffn_dim, D, True)
            norm_specs(specs, f"{hf}.final_layer_norm", (*path, "ffn_norm"), cfg)
    return specs
