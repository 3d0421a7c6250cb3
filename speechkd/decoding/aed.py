"""Greedy and beam search for the :class:`~speechkd.models.aed.AttentionEncoderDecoder`.

Label-synchronous, left-to-right decoding of the attention decoder (Vaswani et al. 2017): each
step re-runs the decoder on the whole prefix ``[sos] + tokens`` (sequences are short, so no
key/value cache) and reads the next-token distribution at the last position. Id 0 is sos, eos and
the CTC blank; an emitted 0 ends a hypothesis, so output tokens never contain 0.

* :func:`greedy_search`: batched argmax decoding.
* :func:`beam_search`: per-utterance beam search, the beam's hypotheses batched into one decoder
  call per step. Scores are total log-probabilities with no length normalisation or length bonus.

Both run under ``torch.no_grad()``; call ``model.eval()`` first if the model has dropout.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from speechkd.models.aed import AttentionEncoderDecoder

__all__ = ["greedy_search", "beam_search"]


def _check_inputs(model: AttentionEncoderDecoder, encoder_out: Tensor, encoder_out_lens: Tensor,
                  max_len: Optional[int]) -> List[int]:
    """Validate (N, T, C) encoder_out, (N,) lens in [1, T] and max_len; return per-utterance max lengths."""
    C = model.decoder.encoder_dim
    if encoder_out.dim() != 3 or encoder_out.shape[-1] != C:
        raise ValueError(f"encoder_out must be (N, T, {C}), got {tuple(encoder_out.shape)}")
    N, T, _ = encoder_out.shape
    if encoder_out_lens.shape != (N,):
        raise ValueError(f"encoder_out_lens must be (N={N},), got {tuple(encoder_out_lens.shape)}")
    lens = [int(v) for v in encoder_out_lens.tolist()]
    if any(not 1 <= v <= T for v in lens):
        raise ValueError(f"encoder_out_lens must lie in [1, T={T}], got {lens}")
    if max_len is not None and max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    return lens if max_len is None else [int(max_len)] * N


@torch.no_grad()
def greedy_search(
    model: AttentionEncoderDecoder,
    encoder_out: Tensor,
    encoder_out_lens: Tensor,
    max_len: Optional[int] = None,
) -> List[List[int]]:
    """Batched greedy (argmax) decoding until eos.

    At step s every unfinished utterance appends ``argmax_k log p(k | [sos] + tokens, x)``; eos (id
    0) ends it and is not included. An utterance also stops after ``max_len`` tokens, so decoding
    always terminates.

    Args:
        model: the AED model (only ``model.decoder`` is used).
        encoder_out: (N, T, C) encoder frames.
        encoder_out_lens: (N,) valid frames per utterance, 1 <= T_n <= T.
        max_len: maximum number of output tokens (eos excluded), >= 0; default: each utterance's
            number of encoder frames T_n.

    Returns:
        N lists of token ids in [1, V) (no sos/eos).

    Raises:
        ValueError: on bad shapes, encoder_out_lens outside [1, T] or max_len < 0.
    """
    limits = _check_inputs(model, encoder_out, encoder_out_lens, max_len)
    N = encoder_out.shape[0]
    device = encoder_out.device
    hyps: List[List[int]] = [[] for _ in range(N)]
    active = [limits[n] > 0 for n in range(N)]
    ys = torch.full((N, 1), model.sos_id, dtype=torch.long, device=device)  # (N, s+1)
    step = 0
    while any(active):
        ys_lens = torch.full((N,), step + 1, dtype=torch.long, device=device)
        logits = model.decoder(encoder_out, encoder_out_lens, ys, ys_lens)[:, -1]  # (N, V)
        tokens = logits.argmax(dim=-1)  # (N,)
        for n, tok in enumerate(tokens.tolist()):
            if not active[n]:
                continue
            if tok == model.eos_id:
                active[n] = False
            else:
                hyps[n].append(tok)
                active[n] = len(hyps[n]) < limits[n]
        # finished rows are fed eos; by causality they do not disturb the others
        next_tok = torch.where(
            torch.tensor(active, device=device), tokens, torch.full_like(tokens, model.eos_id)
        )
        ys = torch.cat([ys, next_tok[:, None]], dim=1)
        step += 1
    return hyps


@torch.no_grad()
def beam_search(
    model: AttentionEncoderDecoder,
    encoder_out: Tensor,
    encoder_out_lens: Tensor,
    beam: int = 4,
    nbest: Optional[int] = None,
    max_len: Optional[int] = None,
) -> List[List[Tuple[List[int], float]]]:
    """Left-to-right beam search returning the N-best finished hypotheses per utterance.

    Per utterance, the running set starts as ``{[sos]}`` with score 0. At each step every running
    hypothesis h (prefix of length s, score S_h) is extended by every token k with score
    ``S_h + log p(k | h, x)``; the candidates are ranked (stable sort, so ties break
    deterministically by hypothesis rank then token id) and

    * eos candidates among the top ``beam`` are finished (eos is not part of the tokens);
    * the top ``beam`` non-eos candidates form the next running set.

    Running hypotheses that reach ``max_len`` tokens get a forced eos step (its log-prob added),
    so every returned score is a full-sequence ``log P(tokens, eos | x)``. Since scores never
    increase along a prefix (no length normalisation), the search stops early, without changing
    the result, once ``nbest`` hypotheses are finished and the ``nbest``-th best of them scores at
    least as high as the best running one. With ``beam=1`` the tokens are those of :func:`greedy_search`.

    Scores are **not** length-normalised: short hypotheses are favoured, as in the plain
    maximum-probability objective; rescore the N-best if another criterion is wanted.

    Args:
        model: the AED model (only ``model.decoder`` is used).
        encoder_out: (N, T, C) encoder frames.
        encoder_out_lens: (N,) valid frames per utterance, 1 <= T_n <= T.
        beam: running hypotheses kept per step (>= 1).
        nbest: hypotheses returned per utterance, 1 <= nbest <= beam; default ``beam``.
        max_len: maximum number of output tokens (eos excluded), >= 0; default: each utterance's
            number of encoder frames T_n.

    Returns:
        For each utterance, up to ``nbest`` distinct pairs ``(token ids in [1, V) without
        sos/eos, total log-prob in nats including the eos step)``, sorted best first.

    Raises:
        ValueError: on bad shapes, encoder_out_lens outside [1, T], beam < 1, nbest outside
            [1, beam] or max_len < 0.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    nbest = beam if nbest is None else nbest
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must lie in [1, beam={beam}], got {nbest}")
    limits = _check_inputs(model, encoder_out, encoder_out_lens, max_len)
    device = encoder_out.device
    eos, V = model.eos_id, model.vocab_size
    results: List[List[Tuple[List[int], float]]] = []
    for n in range(encoder_out.shape[0]):
        T_n = int(encoder_out_lens[n])
        memory = encoder_out[n : n + 1, :T_n]  # (1, T_n, C)
        running: List[Tuple[List[int], float]] = [([], 0.0)]
        finished: List[Tuple[List[int], float]] = []
        for step in range(limits[n] + 1):
            H = len(running)
            ys = torch.tensor([[model.sos_id] + toks for toks, _ in running], dtype=torch.long, device=device)
            logits = model.decoder(
                memory.expand(H, -1, -1), torch.full((H,), T_n, device=device),
                ys, torch.full((H,), step + 1, device=device),
            )[:, -1]  # (H, V)
            log_probs = logits.float().log_softmax(dim=-1).double()  # (H, V)
            if step == limits[n]:  # max_len reached: force eos
                finished += [(toks, sc + float(log_probs[h, eos])) for h, (toks, sc) in enumerate(running)]
                break
            prev = torch.tensor([sc for _, sc in running], dtype=torch.float64, device=device)
            cand = (prev[:, None] + log_probs).reshape(-1)  # (H * V,)
            # at most H <= beam eos candidates, so the top 2 * beam hold the beam best non-eos ones
            top = torch.sort(cand, descending=True, stable=True).indices[: 2 * beam]
            new_running: List[Tuple[List[int], float]] = []
            for rank, (idx, sc) in enumerate(zip(top.tolist(), cand[top].tolist())):
                h, k = divmod(idx, V)
                if k == eos:
                    if rank < beam:
                        finished.append((running[h][0], sc))
                elif len(new_running) < beam:
                    new_running.append((running[h][0] + [k], sc))
            running = new_running
            if not running:
                break
            if len(finished) >= nbest:
                kth = sorted((sc for _, sc in finished), reverse=True)[nbest - 1]
                if kth >= running[0][1]:
                    break
        finished.sort(key=lambda p: p[1], reverse=True)  # stable: earlier-found first on ties
        results.append([(toks, float(sc)) for toks, sc in finished[:nbest]])
    return results
