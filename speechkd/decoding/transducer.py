"""Greedy and beam search for the stateless :class:`~speechkd.models.transducer.Transducer`.

* :func:`greedy_search`: batched frame-synchronous greedy decoding with up to
  ``max_sym_per_frame`` non-blank symbols per encoder frame (Graves 2012, Sec. 2.6 style
  best-path approximation).
* :func:`beam_search`: "modified beam search" (at most one symbol per frame; Kang et al. 2023,
  "Fast and parallel decoding for transducer", ICASSP 2023, as in icefall), batched over utterances
  and vectorised over the hypotheses of one frame. Hypotheses with identical label sequences are
  merged by log-add-exp *before* pruning, so each hypothesis score is the log-sum over its
  surviving one-symbol-per-frame alignments.

Both functions run under ``torch.no_grad()``; call ``model.eval()`` first if the model has
dropout or batch norm.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from speechkd.models.transducer import Transducer

__all__ = ["greedy_search", "beam_search"]


def _check_encoder_out(model: Transducer, encoder_out: Tensor, encoder_out_lens: Tensor) -> None:
    """Raise ValueError unless encoder_out is (N, T, C) with C = encoder_dim and lens are valid."""
    if encoder_out.dim() != 3 or encoder_out.shape[-1] != model.joiner.encoder_dim:
        raise ValueError(
            f"encoder_out must be (N, T, {model.joiner.encoder_dim}), got {tuple(encoder_out.shape)}"
        )
    if encoder_out_lens.dim() != 1 or encoder_out_lens.shape[0] != encoder_out.shape[0]:
        raise ValueError(
            f"encoder_out_lens must be (N={encoder_out.shape[0]},), got {tuple(encoder_out_lens.shape)}"
        )
    if encoder_out_lens.numel() and (
        bool((encoder_out_lens < 0).any()) or bool((encoder_out_lens > encoder_out.shape[1]).any())
    ):
        raise ValueError(f"encoder_out_lens must lie in [0, T={encoder_out.shape[1]}]")


def _decoder_proj(model: Transducer, contexts: Tensor) -> Tensor:
    """Projected predictor output for contexts (M, context_size) -> (M, J)."""
    dec = model.decoder(contexts, need_pad=False)  # (M, 1, D)
    return model.joiner.decoder_proj(dec[:, 0])  # (M, J)


@torch.no_grad()
def greedy_search(
    model: Transducer,
    encoder_out: Tensor,
    encoder_out_lens: Tensor,
    max_sym_per_frame: int = 1,
) -> List[List[int]]:
    """Batched greedy decoding.

    At each frame t < T_n the joiner's argmax symbol is taken; if it is non-blank it is appended and
    the predictor advanced, and the same frame is re-scored, up to ``max_sym_per_frame`` non-blank
    symbols; a blank (or the limit) moves to frame t+1.

    Args:
        model: the transducer (only ``decoder`` and ``joiner`` are used).
        encoder_out: (N, T, C) encoder frames.
        encoder_out_lens: (N,) valid frames per utterance.
        max_sym_per_frame: maximum non-blank symbols emitted per frame (>= 1).

    Returns:
        N lists of token ids (blank excluded).

    Raises:
        ValueError: on bad shapes/lengths or max_sym_per_frame < 1.
    """
    if max_sym_per_frame < 1:
        raise ValueError(f"max_sym_per_frame must be >= 1, got {max_sym_per_frame}")
    _check_encoder_out(model, encoder_out, encoder_out_lens)
    N, T, _ = encoder_out.shape
    device = encoder_out.device
    blank, c = model.blank_id, model.decoder.context_size
    lens = encoder_out_lens.to(device)
    enc_proj = model.joiner.encoder_proj(encoder_out)  # (N, T, J)
    contexts = torch.full((N, c), blank, dtype=torch.long, device=device)  # (N, c)
    dec_proj = _decoder_proj(model, contexts)  # (N, J)
    hyps: List[List[int]] = [[] for _ in range(N)]
    for t in range(T):
        active = t < lens  # (N,)
        if not bool(active.any()):
            break
        for _ in range(max_sym_per_frame):
            logits = model.joiner(enc_proj[:, t], dec_proj, project_input=False)  # (N, V)
            tokens = logits.argmax(dim=-1)  # (N,)
            emit = active & (tokens != blank)  # (N,)
            if not bool(emit.any()):
                break
            idx = emit.nonzero(as_tuple=True)[0]  # (M,)
            for n, tok in zip(idx.tolist(), tokens[idx].tolist()):
                hyps[n].append(tok)
            contexts[idx] = torch.cat([contexts[idx, 1:], tokens[idx, None]], dim=1)  # (M, c)
            dec_proj[idx] = _decoder_proj(model, contexts[idx])
            active = emit  # only rows that just emitted may emit again on this frame
    return hyps


@torch.no_grad()
def beam_search(
    model: Transducer,
    encoder_out: Tensor,
    encoder_out_lens: Tensor,
    beam: int = 4,
    nbest: int = 1,
) -> List[List[Tuple[List[int], float]]]:
    """Modified beam search (one symbol per frame) returning the N-best per utterance.

    Per frame t < T_n, each hypothesis h (label sequence y_h, log-score s_h) is extended by every
    symbol k with score ``s_h + log p_t(k | y_h)``; blank keeps y_h, a label appends k. Candidates
    with the same label sequence (``h`` + blank and ``parent(h)`` + last label of h) are merged by
    log-add-exp, then the ``beam`` best are kept. Hence with ``beam=1`` the result equals
    ``greedy_search(..., max_sym_per_frame=1)``, and with a beam large enough to never prune, each
    score is exactly ``log sum_{alignments} prod_t p_t(a_t)`` over the sequence's
    one-symbol-per-frame alignments.

    Args:
        model: the transducer (only ``decoder`` and ``joiner`` are used).
        encoder_out: (N, T, C) encoder frames.
        encoder_out_lens: (N,) valid frames per utterance.
        beam: number of hypotheses kept per frame (>= 1).
        nbest: number of hypotheses returned per utterance, 1 <= nbest <= beam.

    Returns:
        For each utterance, up to ``nbest`` pairs (token ids without blank, total log-prob in nats),
        sorted best first.

    Raises:
        ValueError: on bad shapes/lengths, beam < 1, or nbest outside [1, beam].
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must lie in [1, beam={beam}], got {nbest}")
    _check_encoder_out(model, encoder_out, encoder_out_lens)
    N, T, _ = encoder_out.shape
    device = encoder_out.device
    blank, c = model.blank_id, model.decoder.context_size
    V = model.joiner.vocab_size
    lens = encoder_out_lens.tolist()
    enc_proj = model.joiner.encoder_proj(encoder_out)  # (N, T, J)

    # Per utterance: label sequences (tuples), scores (h,), projected predictor outputs (h, J).
    init_dec = _decoder_proj(model, torch.full((1, c), blank, dtype=torch.long, device=device))  # (1, J)
    seqs: List[List[Tuple[int, ...]]] = [[()] for _ in range(N)]
    scores: List[Tensor] = [torch.zeros(1, device=device) for _ in range(N)]
    decs: List[Tensor] = [init_dec.clone() for _ in range(N)]

    for t in range(T):
        active = [n for n in range(N) if t < lens[n]]
        if not active:
            break
        sizes = [len(seqs[n]) for n in active]
        dec_all = torch.cat([decs[n] for n in active])  # (H, J)
        row = torch.tensor(active, device=device).repeat_interleave(torch.tensor(sizes, device=device))  # (H,)
        logits = model.joiner(enc_proj[row, t], dec_all, project_input=False)  # (H, V)
        log_probs = logits.float().log_softmax(dim=-1)  # (H, V)

        new_contexts: List[Tuple[int, ...]] = []  # contexts needing a predictor update
        pending: List[Tuple[int, int, int]] = []  # (utterance, new hyp index, row in new_contexts)
        keep: Dict[int, Tuple[List[Tuple[int, ...]], Tensor, Tensor]] = {}
        offset = 0
        for n, h in zip(active, sizes):
            cand = scores[n][:, None] + log_probs[offset:offset + h]  # (h, V)
            offset += h
            # Merge "a + blank" with "parent(a) + last(a)" when parent(a) is also a hypothesis.
            index = {s: i for i, s in enumerate(seqs[n])}
            a_idx, b_idx, toks = [], [], []
            for i, s in enumerate(seqs[n]):
                j = index.get(s[:-1]) if s else None
                if j is not None:
                    a_idx.append(i)
                    b_idx.append(j)
                    toks.append(s[-1])
            if a_idx:
                a = torch.tensor(a_idx, device=device)
                b = torch.tensor(b_idx, device=device)
                k = torch.tensor(toks, device=device)
                cand[a, blank] = torch.logaddexp(cand[a, blank], cand[b, k])
                cand[b, k] = float("-inf")
            flat = cand.reshape(-1)  # (h * V,)
            k_best = min(beam, int(torch.isfinite(flat).sum()))
            top_scores, top_idx = flat.topk(k_best)  # (k,), sorted descending
            src = (top_idx // V).tolist()
            sym = (top_idx % V).tolist()
            new_seqs: List[Tuple[int, ...]] = []
            new_decs = decs[n][top_idx // V]  # (k, J), overwritten below for label extensions
            for i, (hi, k_sym) in enumerate(zip(src, sym)):
                if k_sym == blank:
                    new_seqs.append(seqs[n][hi])
                else:
                    s = seqs[n][hi] + (k_sym,)
                    new_seqs.append(s)
                    ctx = ((blank,) * c + s)[-c:]
                    pending.append((n, i, len(new_contexts)))
                    new_contexts.append(ctx)
            keep[n] = (new_seqs, top_scores, new_decs)

        if new_contexts:
            ctx_t = torch.tensor(new_contexts, dtype=torch.long, device=device)  # (M, c)
            upd = _decoder_proj(model, ctx_t)  # (M, J)
            by_utt: Dict[int, Tuple[List[int], List[int]]] = {}
            for n, i, r in pending:
                by_utt.setdefault(n, ([], []))
                by_utt[n][0].append(i)
                by_utt[n][1].append(r)
            for n, (hyp_rows, upd_rows) in by_utt.items():
                keep[n][2][torch.tensor(hyp_rows, device=device)] = upd[torch.tensor(upd_rows, device=device)]
        for n, (new_seqs, top_scores, new_decs) in keep.items():
            seqs[n], scores[n], decs[n] = new_seqs, top_scores, new_decs

    results: List[List[Tuple[List[int], float]]] = []
    for n in range(N):
        order = torch.argsort(scores[n], descending=True, stable=True)[:nbest].tolist()
        sc = scores[n].tolist()
        results.append([(list(seqs[n][i]), float(sc[i])) for i in order])
    return results
