"""Pure model code: layers, attention, ``encode`` and ``decode``. No slots, pages or schedulers.

Letter key for shape suffixes used across encdec and pallas_kernels (``x_BSD``, ``q_BTNH``):

- ``B`` batch rows (decode slots in the engine)
- ``S`` encoder (source) positions, ``T`` decoder (target) positions, ``K`` attended key positions
- ``D`` model width, ``N`` attention heads, ``H`` head width, ``F`` FFN width, ``V`` vocabulary
- ``L`` layers, ``R`` T5 relative-position buckets
- ``P`` pages in a pool, ``G`` tokens per page, ``M`` page-table width (pages per row)
- audio (Whisper): ``C`` channels into a conv (log-mel bins for the first), ``A`` log-mel frames
  (10 ms hops, twice the encoder positions ``S``), ``W`` conv kernel taps
"""

from encdec.models.kv import DecoderKV, DenseKV
from encdec.models.transformer import decode, encode, init_dense_kv, project_cross_kv

__all__ = ["DecoderKV", "DenseKV", "decode", "encode", "init_dense_kv", "project_cross_kv"]
