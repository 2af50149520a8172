"""NLLB/M2M100, Pegasus and UMT5 through the engine: paged cache, in-flight slots, forced BOS.

Each family's tiny fixture (``ENGINE_OVERRIDES``) tells its inputs apart; the engine's outputs
for 32 mixed requests must equal ``reference_generate`` token for token, and an NLLB-style
translation forced into a target language must equal HF ``generate(forced_bos_token_id=...)``.
"""

import numpy as np
import pytest
import torch

import encdec
from encdec.engine import Engine, Request
from tests.engine.test_engine import MAX_NEW, _requests
from tests.engine.test_engine import _config as engine_config
from tests.tiny_models import ENGINE_OVERRIDES, hf_generation_config, save_hf_model

NEW_FAMILIES = ("m2m_100", "pegasus", "umt5")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """``family -> (HF model, encdec model)``, each saved and loaded once, on first use."""
    loaded = {}

    def get(family):
        if family not in loaded:
            directory = tmp_path_factory.mktemp(f"engine_{family}")
            hf = save_hf_model(family, directory, config=ENGINE_OVERRIDES[family])
            loaded[family] = hf, encdec.load_pretrained(directory)
        return loaded[family]

    return get


def _config(**kw):
    # The CPU window path (the default), and room for a forced language token; one compiled step
    # for both tests.
    return engine_config(**{"attention_impl": "auto", "max_decoder_prefix": 2, **kw})


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_32_mixed_requests_equal_reference(pairs, family):
    _, model = pairs(family)
    requests = _requests(32, 21)
    # One batched reference run: a row's greedy tokens do not depend on the others (masked
    # padding), and the output for fewer tokens is a prefix of the output for MAX_NEW.
    full = encdec.reference_generate(model, [r.inputs for r in requests], MAX_NEW, pad_to_multiple=8)
    distinct = {tuple(o.token_ids) for o in full}
    assert len(distinct) >= 26, f"{family}: {len(distinct)} distinct greedy outputs over 32 inputs"
    assert np.mean([len(set(o.token_ids)) for o in full]) >= 3, f"{family}: outputs repeat one token"

    engine = Engine(model, _config())  # attention_impl "auto": the paged window path on CPU
    outputs = engine.generate(requests)
    for req, out, ref in zip(requests, outputs, full, strict=True):
        assert out.token_ids == ref.token_ids[: req.max_new_tokens], (family, req)
    stats = engine.stats()
    assert stats.self_pages_used == 0 and stats.cross_pages_used == 0
    assert min(stats.slot_fills) >= 2
    engine.self_alloc.check_invariants()
    engine.cross_alloc.check_invariants()


def test_nllb_forced_target_language_matches_hf_generate(pairs):
    """NLLB translates into the language whose code follows the start token.

    HF forces it with ``generate(forced_bos_token_id=lang)`` and returns ``[start, lang, ...]``.
    The engine takes it two ways: ``decoder_prefix=[start, lang]`` returns what follows the
    prefix; ``forced_bos_token_id=lang`` (HF's semantics) returns ``[lang, ...]``.
    """
    hf, model = pairs("m2m_100")
    cfg = model.config
    languages = (93, 94)  # stand-ins for NLLB's language codes, at the top of its vocabulary
    rng = np.random.default_rng(5)
    inputs = [rng.integers(3, 90, int(n)).tolist() for n in (5, 13, 9, 17)]
    S = max(len(x) for x in inputs)
    ids = torch.full((len(inputs), S), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), S), dtype=torch.long)
    for i, x in enumerate(inputs):
        ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    engine = Engine(model, _config())
    by_language = {}
    for lang in languages:
        gen = hf_generation_config(hf, MAX_NEW + 1, cfg.eos_token_id)
        gen.forced_bos_token_id = lang
        with torch.no_grad():
            theirs = hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        prefix = [cfg.decoder_start_token_id, lang]
        ours = engine.generate([Request(x, max_new_tokens=MAX_NEW, decoder_prefix=prefix) for x in inputs])
        forced = engine.generate(
            [Request(x, max_new_tokens=MAX_NEW, forced_bos_token_id=lang) for x in inputs]
        )
        for row, out, out_forced in zip(theirs.tolist(), ours, forced, strict=True):
            assert row[:2] == [cfg.decoder_start_token_id, lang]
            generated = row[1:]
            if cfg.eos_token_id in generated:  # HF pads finished rows after their EOS
                generated = generated[: generated.index(cfg.eos_token_id) + 1]
            assert out.token_ids == generated[1:], (lang, out.token_ids, row)
            # The forced token counts against max_new_tokens, as in HF: one token fewer after it.
            assert out_forced.finish_reason in ("stop", "length"), out_forced.error
            assert out_forced.token_ids == generated[:MAX_NEW], (lang, out_forced.token_ids, row)
        by_language[lang] = [tuple(o.token_ids) for o in ours]
    # The forced token steers the whole output: a test the prefix could pass by being ignored fails.
    assert by_language[languages[0]] != by_language[languages[1]]
