"""Decoding for every model type: :func:`greedy_search` and :func:`nbest_search` pick the search that fits.

Transducers use :mod:`speechkd.decoding.transducer` (greedy, modified beam search); attention
encoder-decoders use :mod:`speechkd.decoding.aed` (greedy, beam search).
"""

from __future__ import annotations

from typing import List, Tuple

from torch import Tensor


def _is_transducer(model) -> bool:
    from speechkd.models.transducer import Transducer

    return isinstance(model, Transducer)


def greedy_search(model, encoder_out: Tensor, encoder_out_lens: Tensor) -> List[List[int]]:
    """Greedy decoding of a batch.

    Args:
      model: a Transducer or an AttentionEncoderDecoder.
      encoder_out: (N, T, C) encoder frames; encoder_out_lens: (N,) valid frames.

    Returns:
      N lists of token ids (no blank, sos or eos).
    """
    if _is_transducer(model):
        from speechkd.decoding import transducer

        return transducer.greedy_search(model, encoder_out, encoder_out_lens)
    from speechkd.decoding import aed

    return aed.greedy_search(model, encoder_out, encoder_out_lens)


def nbest_search(model, encoder_out: Tensor, encoder_out_lens: Tensor, beam: int = 4,
                 nbest: int = 1, ctc_weight: float = 0.0) -> List[List[Tuple[List[int], float]]]:
    """Beam search returning up to ``nbest`` hypotheses per utterance, best first.

    Args:
      model: a Transducer (modified beam search) or an AttentionEncoderDecoder (beam search).
      encoder_out: (N, T, C) encoder frames; encoder_out_lens: (N,) valid frames.
      beam: beam width (>= 1); nbest: hypotheses returned (1 <= nbest <= beam).
      ctc_weight: attention encoder-decoders only: the weight of joint CTC/attention decoding
        (:func:`speechkd.decoding.aed.beam_search`; 0 = attention alone). A transducer ignores it.

    Returns:
      For each utterance a list of ``(token ids, log-prob in nats)`` sorted by score, best first.

    Raises:
      ValueError: bad beam or nbest, or bad shapes (from the search).
    """
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must lie in [1, beam={beam}], got {nbest}")
    if _is_transducer(model):
        from speechkd.decoding import transducer

        return transducer.beam_search(model, encoder_out, encoder_out_lens, beam=beam, nbest=nbest)
    from speechkd.decoding import aed

    return aed.beam_search(model, encoder_out, encoder_out_lens, beam=beam, nbest=nbest, ctc_weight=ctc_weight)
