"""Front ends: what turns a request into encoder inputs, a decoder prefix and a token budget.

The engine knows no model family: a :class:`FrontEnd` names the encoder buckets and row shape,
prepares each request at the door (validating its inputs), supplies the encoder function and
the per-step token masks the decode step applies, and turns generated tokens into text.
:class:`TextFrontEnd` serves every text family (token ids or text through the model's
tokenizer); Whisper's audio front end is ``encdec.whisper.WhisperFrontEnd``, passed in by
``encdec.whisper.whisper_engine``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from encdec.checkpoints.pretrained import Model
from encdec.engine.config import EngineConfig
from encdec.engine.request import Request, RequestError
from encdec.engine.steps import EncoderFn
from encdec.engine.validation import FieldError, TokenIds, unicode_text
from encdec.models import encode
from encdec.processors import LogitsHook
from encdec.sampling import TokenMasks


@dataclasses.dataclass
class Prepared:
    """What a front end makes of one request: all the engine needs to encode and decode it."""

    inputs: np.ndarray | None
    """The request's encoder row before padding (token ids ``[n]``, or log-mel ``[C, A]``);
    the engine drops it once encoded."""
    encoder_len: int
    """Encoder positions the decoder attends to (its cross pages hold them)."""
    prefix: tuple[int, ...]
    """Forced decoder tokens, the start token first."""
    max_new_tokens: int
    """The resolved token budget."""
    detokenize: bool = True
    """Whether its output has text (token-id inputs of a text model do not)."""
    audio_seconds: float | None = None


class FrontEnd(Protocol):
    """How one model's requests enter and leave the engine."""

    encode: EncoderFn
    """The encoder on a batch from :meth:`encoder_batch` (a module-level function: part of the
    compiled step's identity)."""
    default_prefix_len: int
    """Forced prefix length of a request that gives none (sizes ``max_decoder_prefix``)."""
    masks: TokenMasks | None
    """Tokens banned on device at every / the first sampled step, or None."""
    logits_processor: LogitsHook | None
    """A rule applied on device to every slot's scores before the request's processors (a
    module-level function: part of the compiled step's identity), or None."""

    def encoder_buckets(self, config: EngineConfig) -> tuple[int, ...]:
        """Padded encoder lengths, ascending; raises ``ValueError`` if the model cannot take them."""
        ...

    def prepare(self, request: Request, config: EngineConfig) -> Prepared:
        """Check and convert a checked request's inputs; bad inputs raise :class:`RequestError`."""
        ...

    def encoder_batch(self, bucket: int, rows: int, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """``inputs`` padded into one ``rows``-row batch of ``bucket`` positions (extra rows: padding)."""
        ...

    def text(self, prepared: Prepared, token_ids: Sequence[int]) -> str | None:
        """The output text of generated tokens, or None."""
        ...


def encode_tokens(params, cfg, ids_bS: jax.Array, encoder_len_b: jax.Array, *, dtype, lora=None) -> jax.Array:
    """Text families' encoder over right-padded ids (positions past a row's length masked)."""
    S = ids_bS.shape[1]
    mask_bS = jnp.arange(S, dtype=jnp.int32)[None, :] < encoder_len_b[:, None]
    return encode(params, cfg, ids_bS, mask_bS, dtype=dtype, lora=lora)


_IDS = TokenIds()


class TextFrontEnd:
    """Token ids, or text through the model's tokenizer, for every text family."""

    encode = staticmethod(encode_tokens)
    default_prefix_len = 1
    masks = None
    logits_processor = None

    def __init__(self, model: Model):
        if model.config.is_audio:
            raise ValueError(
                f"{model.config.model_type} reads audio: use encdec.whisper.whisper_engine(model) "
                "or pass frontend=encdec.whisper.WhisperFrontEnd(model)"
            )
        self.model_config = model.config
        self.tokenizer = model.tokenizer

    def encoder_buckets(self, config: EngineConfig) -> tuple[int, ...]:
        cfg = self.model_config
        if cfg.position != "relative" and config.max_encoder_len > cfg.max_positions:
            raise ValueError(
                f"max_encoder_len={config.max_encoder_len} exceeds the model's {cfg.max_positions} positions"
            )
        return config.encoder_buckets

    def prepare(self, request: Request, config: EngineConfig) -> Prepared:
        cfg = self.model_config
        ids, is_text = self._ids(request.inputs)
        if not ids:
            raise RequestError("input is empty")
        if len(ids) > config.max_encoder_len:
            if not config.truncate_long_inputs:
                raise RequestError(
                    f"input has {len(ids)} tokens, above max_encoder_len={config.max_encoder_len} "
                    "(set truncate_long_inputs=True to truncate)"
                )
            ids = ids[: config.max_encoder_len]
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise RequestError(f"token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
        prefix = request.decoder_prefix or (cfg.decoder_start_token_id,)
        max_new = config.default_max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
        return Prepared(np.asarray(ids, np.int32), len(ids), tuple(prefix), max_new, detokenize=is_text)

    def _ids(self, inputs: Any) -> tuple[tuple[int, ...], bool]:
        if isinstance(inputs, str):
            if self.tokenizer is None:
                raise RequestError("text input needs a tokenizer; this model has none (pass token ids)")
            try:
                unicode_text("inputs", inputs)
            except FieldError as e:
                raise RequestError(str(e)) from None
            return tuple(int(t) for t in self.tokenizer(inputs)["input_ids"]), True
        if not isinstance(inputs, list | tuple | range | np.ndarray):
            raise RequestError(
                f"{self.model_config.model_type} has no audio encoder: inputs must be text or token ids "
                f"(a list, tuple or 1-D integer array), got {type(inputs).__name__}"
            )
        try:
            return _IDS.check("inputs", inputs), False
        except FieldError as e:
            raise RequestError(str(e)) from None

    def encoder_batch(self, bucket: int, rows: int, inputs: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.full((rows, bucket), self.model_config.pad_token_id, np.int32)
        for r, ids in enumerate(inputs):
            batch[r, : len(ids)] = ids
        return batch

    def text(self, prepared: Prepared, token_ids: Sequence[int]) -> str | None:
        if not prepared.detokenize or self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
