"""Teacher labels of every kind, in one home.

- :mod:`speechkd.labels.stages`: the labelling stages (``extract``: float embeddings of a teacher layer,
  ``quantize``: codebook indexes (CI) of those, ``pseudo-label``: N-best lists), each split into shards of batches
  by ``--shard i/n`` or by rank in a multi-process run, resumable, merged deterministically.
- :mod:`speechkd.labels.store`: per-frame labels (CI or float embeddings) in HDF5 beside lhotse cuts, with the
  quantizer / teacher ids that refuse foreign labels.
- :mod:`speechkd.labels.codec`: codebook indexes range-coded losslessly (a per-codebook model per file), read
  through lhotse's reader registry like any other array.
- :mod:`speechkd.labels.nbest`: N-best lists in resumable JSON-lines parts, the teacher id checked.
- :mod:`speechkd.labels.shards`: which batches a shard labels, where its parts go, how they are merged.
"""

from speechkd.labels import codec as _codec  # noqa: F401,E402  (registers the range-coded CI reader with lhotse)
