"""Multi-codebook vector quantization for MVQ-KD (Guo et al., ICASSP 2023, arXiv 2211.00508).

- :mod:`speechkd.mvq.quantizer`: :class:`Quantizer` (residual k-means codebooks, beam-search encoding to
  ``num_codebooks`` uint8 codebook indexes (CI) per frame) and :func:`train_quantizer`.
- :mod:`speechkd.mvq.store`: per-frame teacher labels (CI or float embeddings) stored in HDF5 beside lhotse cuts.
"""

from speechkd.mvq.quantizer import Quantizer, train_quantizer
from speechkd.mvq.store import (
    check_label_meta,
    label_file_bytes,
    label_storage_bytes,
    load_frame_labels,
    write_frame_labels,
)

__all__ = [
    "Quantizer",
    "train_quantizer",
    "write_frame_labels",
    "load_frame_labels",
    "check_label_meta",
    "label_storage_bytes",
    "label_file_bytes",
]
