"""LoRA: adapter pytrees beside the parameters, merging, fine-tuning, PEFT files, an adapter bank.

An adapter tree mirrors the parameter tree: ``lora["decoder"]["layers"][i]["cross_attn"]["q"]``
holds ``a`` ``[D, r]``, ``b`` ``[r, N, H]`` and ``scale`` for the weight ``w`` ``[D, N, H]``. Pass
it as ``lora=`` to ``encode``/``init_dense_kv``/``decode``/``reference_generate``, or fold it in
with :func:`merge_adapter`. With a leading batch axis (:meth:`AdapterBank.gather`) every row
uses its own adapter.
"""

from encdec.lora.adapters import (
    AdapterError,
    LoraConfig,
    check_adapter,
    init_lora,
    merge_adapter,
    unmerge_adapter,
)
from encdec.lora.bank import AdapterBank
from encdec.lora.peft import load_peft, save_peft

__all__ = [
    "AdapterBank",
    "AdapterError",
    "LoraConfig",
    "check_adapter",
    "init_lora",
    "load_peft",
    "merge_adapter",
    "save_peft",
    "unmerge_adapter",
]
