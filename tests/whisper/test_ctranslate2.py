"""The CTranslate2 ``model.bin`` reader: against CTranslate2's own writer and runtime, and bad files."""

import json
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import encdec
import encdec.models.whisper as whisper_model
from encdec.checkpoints.ctranslate2 import read_model_bin, read_vocabulary
from encdec.config import UnsupportedModelError
from encdec.models.quant import dequantize_params
from encdec.models.whisper import encode_audio
from encdec.whisper.serving import whisper_engine
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import greedy_decode
from tests.whisper.tiny_whisper import PROMPT, SUPPRESS, SUPPRESS_BEGIN, VOCABULARY, random_mel, save_ct2

ctranslate2 = pytest.importorskip("ctranslate2")


def test_ct2_and_hf_checkpoints_give_the_same_model(tiny_hf_dir, tiny_ct2_dir):
    hf, ct2 = encdec.load_pretrained(tiny_hf_dir), encdec.load_pretrained(tiny_ct2_dir)
    assert hf.config == ct2.config
    assert jax.tree.structure(hf.params) == jax.tree.structure(ct2.params)
    for a, b in zip(jax.tree.leaves(hf.params), jax.tree.leaves(ct2.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reader_sees_the_spec(tiny_ct2_dir):
    ct2 = read_model_bin(tiny_ct2_dir / "model.bin")
    assert (ct2.spec, ct2.revision) == ("WhisperSpec", 3)
    assert ct2.aliases["decoder/projection/weight"] == "decoder/embeddings/weight"  # the tied head
    assert len(ct2.aliases) > 1  # the writer also aliases identical tensors (the all-ones norm scales)
    assert ct2.get("decoder/layer_0/self_attention/linear_0/weight").shape == (3 * 32, 32)  # fused q|k|v
    assert ct2.get("decoder/layer_0/attention/linear_1/weight").shape == (2 * 32, 32)  # fused cross k|v
    tokens = WhisperTokens.from_dir(tiny_ct2_dir)
    assert (tokens.suppress, tokens.suppress_begin, tokens.prompt("en")) == (
        tuple(SUPPRESS),
        tuple(SUPPRESS_BEGIN),
        PROMPT,
    )


def test_greedy_tokens_match_ctranslate2(tiny_ct2_dir):
    mel = random_mel(3, seed=5)
    peer = ctranslate2.models.Whisper(
        str(tiny_ct2_dir), device="cpu", compute_type="float32", intra_threads=1
    )
    # max_length 40 lets CTranslate2 generate min(40 / 2, 40 - 3) = 20 tokens.
    theirs = peer.generate(ctranslate2.StorageView.from_array(mel), [PROMPT] * 3, beam_size=1, max_length=40)
    model = encdec.load_pretrained(tiny_ct2_dir)
    ours, _ = greedy_decode(model, mel, WhisperTokens.from_dir(tiny_ct2_dir), PROMPT, max_new_tokens=20)
    assert ours == [r.sequences_ids[0] for r in theirs]


def test_float16_file_reads_as_float32(tiny_hf_model, tmp_path):
    model16 = encdec.load_pretrained(save_ct2(tiny_hf_model, tmp_path / "f16", quantization="float16"))
    ct2 = read_model_bin(tmp_path / "f16" / "model.bin")
    assert ct2.dtypes["decoder/embeddings/weight"] == "float16"
    table = np.asarray(model16.params["shared"]["embedding_VD"])
    assert table.dtype == np.float32
    np.testing.assert_array_equal(table, ct2.get("decoder/embeddings/weight").astype(np.float32))


@pytest.mark.parametrize("quantization", ["int8", "int8_float16", "int8_float32"])
def test_int8_files_load_as_int8(tiny_hf_model, tiny_ct2_dir, tmp_path, quantization):
    """CTranslate2's int8 codes and scales are kept as they are (``w = int8 / weight_scale``
    there, ``int8 * w_scale`` here); they are the codes encdec's own quantizer gives the float
    file, so both int8 models decode alike."""
    model = encdec.load_pretrained(
        save_ct2(tiny_hf_model, tmp_path / quantization, quantization=quantization)
    )
    assert model.quantize == "int8"
    ct2 = read_model_bin(tmp_path / quantization / "model.bin")
    name = "decoder/layer_0/attention/linear_1/weight"  # fused cross k|v: [2D, D]
    codes, inverse = ct2.get(name), ct2.float32(f"{name}_scale")
    v = model.params["decoder"]["layers"][0]["cross_attn"]["v"]
    D = codes.shape[1]
    np.testing.assert_array_equal(np.asarray(v["w"]).reshape(D, D), codes[D:].T)
    np.testing.assert_allclose(np.asarray(v["w_scale"]).reshape(D), 1.0 / inverse[D:], rtol=1e-6)
    # Every weight is within half a step of the float file's, as encdec's own quantizer's are.
    float_params = encdec.load_pretrained(tiny_ct2_dir).params
    ours = encdec.load_pretrained(tiny_ct2_dir, quantize="int8")
    assert jax.tree.structure(model.params) == jax.tree.structure(ours.params)
    for q, f in ((model, float_params), (ours, float_params)):
        deq = dequantize_params(q.params)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(deq), jax.tree.leaves(f), strict=True):
            step = np.abs(np.asarray(b)).max() / 127 if "embedding" in str(path) or "'w'" in str(path) else 0
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), atol=step / 2 * 1.001 + 1e-3 * (step == 0)
            )
    got, _ = greedy_decode(
        model, random_mel(2, seed=5), WhisperTokens.from_dir(tiny_ct2_dir), PROMPT, max_new_tokens=8
    )
    assert [len(t) for t in got] == [8, 8]


def test_unsupported_quantization_is_refused_clearly(tiny_hf_model, tmp_path):
    save_ct2(tiny_hf_model, tmp_path / "int16", quantization="int16")
    with pytest.raises(UnsupportedModelError, match="quantized to int16 are not supported"):
        encdec.load_pretrained(tmp_path / "int16")


@pytest.mark.parametrize("keep", [0, 3, 9, 40, 5000, -1])
def test_truncated_model_bin(tiny_ct2_dir, tmp_path, keep):
    directory = tmp_path / "cut"
    shutil.copytree(tiny_ct2_dir, directory)
    data = (tiny_ct2_dir / "model.bin").read_bytes()
    (directory / "model.bin").write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(encdec.CheckpointError, match="empty|truncated"):
        encdec.load_pretrained(directory)


def test_trailing_garbage_and_wrong_version(tiny_ct2_dir, tmp_path):
    data = (tiny_ct2_dir / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data + b"\0\0")
    with pytest.raises(encdec.CheckpointError, match="unexpected bytes after the last alias"):
        read_model_bin(tmp_path / "model.bin")
    (tmp_path / "model.bin").write_bytes(struct.pack("<I", 5) + data[4:])
    with pytest.raises(encdec.CheckpointError, match="binary version 5"):
        read_model_bin(tmp_path / "model.bin")
    (tmp_path / "model.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(encdec.CheckpointError, match="corrupt"):
        read_model_bin(tmp_path / "model.bin")


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _model_bin(variables, aliases=()) -> bytes:
    """A hand-written model.bin: ``variables`` are ``(name, dims, dtype_id, nbytes, payload)``."""
    out = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, dims, type_id, nbytes, payload in variables:
        out += _string(name) + struct.pack("<B", len(dims)) + b"".join(struct.pack("<I", d) for d in dims)
        out += struct.pack("<BI", type_id, nbytes) + payload
    out += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(t) for a, t in aliases)
    return out


@pytest.mark.parametrize(
    "variables, aliases, message",
    [
        ([("w", (2,), 9, 8, b"\0" * 8)], (), "unknown dtype id 9"),
        ([("w", (2, 3), 0, 20, b"\0" * 20)], (), "declares 20 bytes, expected 24"),
        ([("w", (2,), 0, 8, b"\0" * 8)], [("p", "missing")], "points to missing variable"),
        ([("w", (2,), 0, 8, b"\0" * 8), ("w", (2,), 0, 8, b"\0" * 8)], (), "appears twice"),
        ([("w", (1,) * 9, 0, 4, b"\0" * 4)], (), "rank 9"),
    ],
)
def test_corrupt_headers(tmp_path, variables, aliases, message):
    (tmp_path / "model.bin").write_bytes(_model_bin(variables, aliases))
    with pytest.raises(encdec.CheckpointError, match=message):
        read_model_bin(tmp_path / "model.bin")


def test_hand_written_file_round_trips(tmp_path):
    w = np.arange(6, dtype=np.float16).reshape(2, 3)
    bf16 = (np.array([1.5, -2.0], np.float32).view(np.uint32) >> 16).astype("<u2")
    (tmp_path / "model.bin").write_bytes(
        _model_bin([("w", (2, 3), 4, 12, w.tobytes()), ("b", (2,), 5, 4, bf16.tobytes())], [("v", "w")])
    )
    ct2 = read_model_bin(tmp_path / "model.bin")
    np.testing.assert_array_equal(ct2.float32("v"), w.astype(np.float32))
    np.testing.assert_array_equal(ct2.float32("b"), [1.5, -2.0])


def test_vocabulary_txt_splits_on_newlines_only(tmp_path):
    tokens = ["a", "b\x85c", "d\u2028e", "f\rg", ""]  # other line breaks belong to tokens
    (tmp_path / "vocabulary.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    assert read_vocabulary(tmp_path) == tokens
    (tmp_path / "vocabulary.json").write_text(json.dumps(VOCABULARY))
    assert read_vocabulary(tmp_path) == VOCABULARY


def test_vocabulary_size_must_match(tiny_ct2_dir, tmp_path):
    directory = tmp_path / "badvocab"
    shutil.copytree(tiny_ct2_dir, directory)
    (directory / "vocabulary.json").write_text(json.dumps(VOCABULARY[:-1]))
    with pytest.raises(encdec.CheckpointError, match="vocabulary has 95 tokens"):
        encdec.load_pretrained(directory)


def test_an_int8_audio_encoder_multiplies_in_bfloat16(tiny_ct2_dir, monkeypatch):
    """Whisper's int8 encoder rounds ``w * w_scale`` and its activations to bfloat16 (no per-row
    activation quantization): its states are those of the float model holding those weights,
    not of the int8 kernel's products; an engine converts its encoder once, not per call, and
    keeps the K/V its decode attention reads in bfloat16."""
    q = encdec.load_pretrained(tiny_ct2_dir, quantize="int8")
    cfg = q.config
    mel = jnp.asarray(random_mel(2, seed=3))
    floats = dequantize_params(q.params)["encoder"]
    weights_to_bf16 = lambda path, x: x.astype(jnp.bfloat16) if path[-1].key == "w" else x  # noqa: E731
    twin = {**q.params, "encoder": jax.tree_util.tree_map_with_path(weights_to_bf16, floats)}
    got = np.asarray(encode_audio(q.params, cfg, mel))
    np.testing.assert_allclose(got, np.asarray(encode_audio(twin, cfg, mel)), rtol=1e-5, atol=1e-5)
    engine = whisper_engine(q, num_slots=2)
    dtypes = {x.dtype for x in jax.tree.leaves(engine.params["encoder"])}
    assert jnp.dtype(jnp.int8) not in dtypes and jnp.dtype(jnp.bfloat16) in dtypes
    # Its decode attention reads bfloat16 K/V (bits in uint16): the cross K/V outweigh the weights.
    assert engine.window_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(engine.state.window)} == {jnp.dtype(jnp.uint16)}
    monkeypatch.setattr(whisper_model, "encoder_weights", lambda enc: enc)  # int8 products instead
    assert np.abs(np.asarray(encode_audio(q.params, cfg, mel)) - got).max() > 1e-3
