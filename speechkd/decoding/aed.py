"""Greedy and beam search for the :class:`~speechkd.models.aed.AttentionEncoderDecoder`.

Label-synchronous, left-to-right decoding of the attention decoder (Vaswani et al. 2017): each
step re-runs the decoder on the whole prefix ``[sos] + tokens`` (sequences are short, so no
key/value cache) and reads the next-token distribution at the last position. Id 0 is sos, eos and
the CTC blank; an emitted 0 ends a hypothesis, so output tokens never contain 0.

* :func:`greedy_search`: batched argmax decoding.
* :func:`beam_search`: per-utterance beam search, the beam's hypotheses batched into one decoder
  call per step. Scores are total log-probabilities with no length normalisation or length bonus;
  with ``ctc_weight > 0`` they are the joint CTC/attention scores of Watanabe et al. (2017), the CTC
  prefix probabilities computed by :class:`CTCPrefixScorer`, which ends hypotheses where the CTC
  branch says the speech ends.

Both run under ``torch.no_grad()``; call ``model.eval()`` first if the model has dropout.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from speechkd.models.aed import AttentionEncoderDecoder

__all__ = ["greedy_search", "beam_search", "CTCPrefixScorer"]


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


class CTCPrefixScorer:
    """CTC prefix probabilities of one utterance for label-synchronous joint CTC/attention decoding.

    Watanabe, Hori, Kim, Hershey, Hayashi, "Hybrid CTC/Attention Architecture for End-to-End Speech Recognition",
    IEEE JSTSP 2017, sec. IV-B, Algorithm 2: for a prefix g the forward variables ``r^n_t(g)`` / ``r^b_t(g)`` are
    the probabilities of the frames 1..t emitting g with the last frame a label / a blank; extending g by a label c
    gives ``h = g + c`` with

        phi_t = r^b_t(g) + (0 if c == last(g) else r^n_t(g))
        r^n_1(h) = x_1(c) if g is empty else 0;   r^b_1(h) = 0
        r^n_t(h) = (r^n_{t-1}(h) + phi_{t-1}) x_t(c);   r^b_t(h) = (r^b_{t-1}(h) + r^n_{t-1}(h)) x_t(blank)
        psi(h) = r^n_1(h) + sum_{t=2..T} phi_{t-1} x_t(c)

    where ``x_t(k)`` is the CTC posterior of k at frame t; ``psi(h)`` is the probability of every CTC path whose
    labels start with h. Ending g (eos) scores ``r^n_T(g) + r^b_T(g)``: the whole CTC probability of g. Everything
    is in the log domain, over a batch of H prefixes and all V tokens at once; the loop runs over the T frames.

    Args:
      log_probs: (T, V) CTC log-posteriors of one utterance's valid frames.
      blank: the CTC blank id (also the AED's eos id, scored as the end of the hypothesis).

    The state of a batch of prefixes is ``(r, last)``: ``r (H, T, 2)`` log ``(r^n_t, r^b_t)``; ``last (H,)`` the
    prefix's last label (-1 for the empty prefix).
    """

    def __init__(self, log_probs: Tensor, blank: int = 0):
        if log_probs.dim() != 2 or log_probs.shape[0] < 1:
            raise ValueError(f"log_probs must be (T >= 1, V), got {tuple(log_probs.shape)}")
        self.x = log_probs.double()  # (T, V)
        self.blank = blank

    def initial_state(self) -> Tuple[Tensor, Tensor]:
        """The empty prefix: ``r^n_t = 0``, ``r^b_t = prod_{tau <= t} x_tau(blank)``; shapes (1, T, 2) and (1,)."""
        T = self.x.shape[0]
        r = torch.full((1, T, 2), float("-inf"), dtype=torch.float64, device=self.x.device)
        r[0, :, 1] = torch.cumsum(self.x[:, self.blank], dim=0)
        return r, torch.full((1,), -1, dtype=torch.long, device=self.x.device)

    def score(self, state: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        """Log prefix probabilities of every one-token extension of each of H prefixes.

        Args:
          state: ``(r (H, T, 2), last (H,))`` of the prefixes g.

        Returns:
          ``(log_psi (H, V), r_new (H, T, V, 2))``: ``log_psi[h, c]`` is log psi(g_h + c) for every label c and, at
          ``c = blank``, the log CTC probability of g_h ending there (eos); ``r_new[h, :, c]`` is the state of
          g_h + c (meaningless at ``c = blank``).
        """
        r, last = state
        x = self.x  # (T, V)
        H, T = r.shape[0], x.shape[0]
        V = x.shape[1]
        same = torch.arange(V, device=x.device)[None, :] == last[:, None]  # (H, V): c == last(g)
        r_n, r_b = r[..., 0], r[..., 1]  # (H, T)
        phi = torch.where(same[:, None, :], r_b[..., None], torch.logaddexp(r_n, r_b)[..., None])  # (H, T, V)
        new = torch.full((H, T, V, 2), float("-inf"), dtype=torch.float64, device=x.device)
        empty = (last < 0)[:, None]  # (H, 1)
        new[:, 0, :, 0] = torch.where(empty, x[0][None, :], torch.full_like(new[:, 0, :, 0], float("-inf")))
        for t in range(1, T):
            new[:, t, :, 0] = torch.logaddexp(new[:, t - 1, :, 0], phi[:, t - 1]) + x[t][None, :]
            new[:, t, :, 1] = torch.logaddexp(new[:, t - 1, :, 1], new[:, t - 1, :, 0]) + x[t, self.blank]
        if T > 1:
            arrivals = torch.logsumexp(phi[:, :-1] + x[1:][None], dim=1)  # (H, V): sum_t phi_{t-1} x_t(c)
            log_psi = torch.logaddexp(new[:, 0, :, 0], arrivals)
        else:
            log_psi = new[:, 0, :, 0].clone()
        log_psi[:, self.blank] = torch.logaddexp(r_n[:, -1], r_b[:, -1])  # eos: the whole CTC probability of g
        return log_psi, new


@torch.no_grad()
def beam_search(
    model: AttentionEncoderDecoder,
    encoder_out: Tensor,
    encoder_out_lens: Tensor,
    beam: int = 4,
    nbest: Optional[int] = None,
    max_len: Optional[int] = None,
    ctc_weight: float = 0.0,
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

    Joint CTC/attention decoding (Watanabe et al. 2017, sec. IV-B, eq. 44-45) with ``ctc_weight`` = lambda > 0:
    a hypothesis scores ``(1 - lambda) log p_att(h | x) + lambda log p_ctc(h | x)``, the CTC term the prefix
    probability of :class:`CTCPrefixScorer` (the whole CTC probability once h has ended). The CTC branch gives
    no probability to more labels than frames and little to labels the audio does not hold, so hypotheses stop
    where the speech does: the fix for a small AED whose attention has not learned to emit eos. Early stopping
    still holds (each CTC prefix probability bounds every extension's).

    Args:
        model: the AED model (only ``model.decoder`` is used).
        encoder_out: (N, T, C) encoder frames.
        encoder_out_lens: (N,) valid frames per utterance, 1 <= T_n <= T.
        beam: running hypotheses kept per step (>= 1).
        nbest: hypotheses returned per utterance, 1 <= nbest <= beam; default ``beam``.
        max_len: maximum number of output tokens (eos excluded), >= 0; default: each utterance's
            number of encoder frames T_n.
        ctc_weight: lambda in [0, 1] of joint decoding; 0 = attention only (the model needs no CTC head).

    Returns:
        For each utterance, up to ``nbest`` distinct pairs ``(token ids in [1, V) without
        sos/eos, total log-prob in nats including the eos step)``, sorted best first; with
        ``ctc_weight > 0`` the score is the joint score above.

    Raises:
        ValueError: on bad shapes, encoder_out_lens outside [1, T], beam < 1, nbest outside
            [1, beam], max_len < 0, ctc_weight outside [0, 1], or ctc_weight > 0 for a model without
            a CTC head.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    nbest = beam if nbest is None else nbest
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must lie in [1, beam={beam}], got {nbest}")
    if not 0.0 <= ctc_weight <= 1.0:
        raise ValueError(f"ctc_weight must lie in [0, 1], got {ctc_weight}")
    if ctc_weight > 0 and getattr(model, "ctc_output", None) is None:
        raise ValueError("ctc_weight > 0 needs a model with a CTC head (model.ctc_head: true)")
    limits = _check_inputs(model, encoder_out, encoder_out_lens, max_len)
    results: List[List[Tuple[List[int], float]]] = []
    for n in range(encoder_out.shape[0]):
        T_n = int(encoder_out_lens[n])
        memory = encoder_out[n : n + 1, :T_n]  # (1, T_n, C)
        scorer = None
        if ctc_weight > 0:
            scorer = CTCPrefixScorer(model.ctc_output(memory[0]).float().log_softmax(-1), blank=model.blank_id)
        results.append(_search_utterance(model, memory, beam, nbest, limits[n], scorer, ctc_weight))
    return results



def _search_utterance(model, memory: Tensor, beam: int, nbest: int, limit: int,
                      scorer: Optional[CTCPrefixScorer] = None, ctc_weight: float = 0.0) -> List[Tuple[List[int], float]]:
    """:func:`beam_search` of one utterance (``memory (1, T_n, C)``): attention scores alone, or with ``scorer`` the
    joint CTC/attention scores. A running hypothesis is ``(tokens, score, CTC prefix log-prob, CTC state r (T, 2))``
    (the CTC fields are unused without a scorer)."""
    device = memory.device
    eos, T_n = model.eos_id, memory.shape[1]
    lam = float(ctc_weight) if scorer is not None else 0.0
    r0 = scorer.initial_state()[0][0] if scorer is not None else None
    running = [([], 0.0, 0.0, r0)]
    finished: List[Tuple[List[int], float]] = []
    for step in range(limit + 1):
        H = len(running)
        ys = torch.tensor([[model.sos_id] + toks for toks, *_ in running], dtype=torch.long, device=device)
        logits = model.decoder(memory.expand(H, -1, -1), torch.full((H,), T_n, device=device),
                               ys, torch.full((H,), step + 1, device=device))[:, -1]  # (H, V)
        att = logits.float().log_softmax(dim=-1).double()  # (H, V)
        prev = torch.tensor([h[1] for h in running], dtype=torch.float64, device=device)  # (H,)
        if scorer is None:
            cand = prev[:, None] + att  # (H, V)
        else:
            r = torch.stack([h[3] for h in running])  # (H, T, 2)
            last = torch.tensor([toks[-1] if toks else -1 for toks, *_ in running], dtype=torch.long, device=device)
            log_psi, r_new = scorer.score((r, last))  # (H, V), (H, T, V, 2)
            prev_ctc = torch.tensor([h[2] for h in running], dtype=torch.float64, device=device)  # (H,)
            cand = prev[:, None] + (1 - lam) * att + lam * (log_psi - prev_ctc[:, None])  # (H, V)
        if step == limit:  # max_len reached: force eos
            finished += [(h[0], float(cand[i, eos])) for i, h in enumerate(running)]
            break
        flat = cand.reshape(-1)  # (H * V,)
        # at most H <= beam eos candidates, so the top 2 * beam hold the beam best non-eos ones
        top = torch.sort(flat, descending=True, stable=True).indices[: 2 * beam]
        new_running = []
        for rank, (idx, sc) in enumerate(zip(top.tolist(), flat[top].tolist())):
            if sc == float("-inf"):  # CTC allows no such extension (nor any of those after it)
                break
            h, k = divmod(idx, cand.shape[1])
            if k == eos:
                if rank < beam:
                    finished.append((running[h][0], sc))
            elif len(new_running) < beam:
                ctc = (float(log_psi[h, k]), r_new[h, :, k]) if scorer is not None else (0.0, None)
                new_running.append((running[h][0] + [k], sc, *ctc))
        running = new_running
        if not running:
            break
        if len(finished) >= nbest:
            kth = sorted((sc for _, sc in finished), reverse=True)[nbest - 1]
            if kth >= running[0][1]:
                break
    finished.sort(key=lambda p: p[1], reverse=True)  # stable: earlier-found first on ties
    return [(toks, float(sc)) for toks, sc in finished[:nbest]]
