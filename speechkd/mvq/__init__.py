"""Multi-codebook vector quantization for MVQ-KD (Guo et al., ICASSP 2023, arXiv 2211.00508).

- :mod:`speechkd.mvq.quantizer`: :class:`Quantizer` (residual k-means codebooks, beam-search encoding to
  ``num_codebooks`` uint8 codebook indexes (CI) per frame) and :func:`train_quantizer`.

The CI are stored like every per-frame teacher label, by :mod:`speechkd.labels.store`.
"""

from speechkd.mvq.quantizer import Quantizer, train_quantizer

__all__ = ["Quantizer", "train_quantizer"]
