"""Use a trained model: ``speechkd.load(model_dir).transcribe(audio)`` for ASR (transducer or attention
encoder-decoder), ``.classify(audio)`` / ``.embed(audio)`` / ``.verify(a, b)`` for an SSL recipe's keyword-spotting and
speaker-verification model (:class:`SslModel`).

``model_dir`` is either a trained run (``students/<name>-seed<k>/`` or ``teacher/``: ``model.safetensors`` +
``model.json``, run by PyTorch, its tokenizer found beside it or in the experiment's ``lang/``) or an ONNX export
(``speechkd export``: ``encoder.onnx`` ... ``tokens.txt``, run by onnxruntime). Audio is a file path (any format
soundfile reads, any sampling rate, any channel count: downmixed and resampled to 16 kHz) or a float array with its
sampling rate; features are speechkd's 80-bin fbank (10 ms); decoding is greedy search, as the evaluation's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from speechkd.utils import Pathlike

__all__ = ["SAMPLE_RATE", "SslModel", "Transcriber", "load", "read_audio"]

SAMPLE_RATE = 16000
"""Hz the models take; other rates are resampled."""

Audio = Union[str, os.PathLike, np.ndarray]


def read_audio(audio: Audio, sampling_rate: Optional[int] = None, max_seconds: Optional[float] = None) -> np.ndarray:
    """A mono float32 waveform at 16 kHz from a file or an array.

    Args:
      audio: a path, or a ``(S,)`` / ``(S, C)`` float array (then ``sampling_rate`` is required).
      sampling_rate: the array's rate in Hz.
      max_seconds: refuse longer audio (None: no limit).

    Returns:
      ``(S',)`` float32 samples at :data:`SAMPLE_RATE`.

    Raises:
      ValueError: unreadable or empty audio, non-finite samples, a missing ``sampling_rate``, or audio longer than
        ``max_seconds`` (each naming the file).
    """
    from math import gcd

    from scipy.signal import resample_poly

    if isinstance(audio, (str, os.PathLike)):
        import soundfile as sf

        name = str(audio)
        try:
            wav, sr = sf.read(name, dtype="float32", always_2d=False)
        except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / OSError
            raise ValueError(f"{name}: cannot read audio ({e})") from None
    else:
        if sampling_rate is None:
            raise ValueError("an audio array needs its sampling_rate")
        name, wav, sr = "array", np.asarray(audio, dtype=np.float32), int(sampling_rate)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"{name}: no audio samples")
    if not np.isfinite(wav).all():
        raise ValueError(f"{name}: audio holds NaN or infinite samples")
    if max_seconds is not None and wav.size / sr > max_seconds:
        raise ValueError(f"{name}: {wav.size / sr:.1f} s of audio is longer than {max_seconds:g} s; cut it into shorter "
                         "pieces (e.g. at pauses) or raise max_seconds")
    if sr != SAMPLE_RATE:
        g = gcd(int(sr), SAMPLE_RATE)
        wav = resample_poly(wav, SAMPLE_RATE // g, int(sr) // g).astype(np.float32)
    return wav


def _pieces_to_text(pieces: Sequence[str]) -> str:
    return "".join(pieces).replace("\u2581", " ").strip()


class Transcriber:
    """An ASR model with its tokens, run by PyTorch or onnxruntime (see :func:`load`).

    Args:
      decode: ``list of (T, 80) fbank -> list of token id lists``.
      pieces: the token pieces by id (id 0 = blank).
      max_seconds: longest audio accepted by :meth:`transcribe`.
      backend: ``"pytorch"`` or ``"onnx"`` (for messages).
    """

    def __init__(self, decode, pieces: Sequence[str], max_seconds: float = 60.0, backend: str = "pytorch"):
        self._decode, self.pieces, self.max_seconds, self.backend = decode, list(pieces), float(max_seconds), backend

    def transcribe(self, audio: Union[Audio, Sequence[Audio]], sampling_rate: Optional[int] = None,
                   batch_size: int = 8) -> Union[str, list[str]]:
        """Text of one audio input, or of each of a list of them.

        Args:
          audio: a path or array, or a list of them (arrays need ``sampling_rate``).
          sampling_rate: the arrays' rate in Hz.
          batch_size: utterances decoded together.

        Returns:
          the text (one input) or the texts in input order (a list).

        Raises:
          ValueError: as :func:`read_audio` (naming the file).
        """
        from speechkd.data.features import fbank_extractor

        single = isinstance(audio, (str, os.PathLike)) or (isinstance(audio, np.ndarray) and audio.ndim == 1)
        items = [audio] if single else list(audio)
        fe = fbank_extractor()
        feats = [fe.extract(read_audio(a, sampling_rate, self.max_seconds), SAMPLE_RATE) for a in items]
        texts: list[str] = []
        for start in range(0, len(feats), batch_size):
            for ids in self._decode(feats[start:start + batch_size]):
                texts.append(_pieces_to_text([self.pieces[i] for i in ids]))
        return texts[0] if single else texts


class SslModel:
    """An SSL recipe's downstream model (an encoder with a keyword-spotting and / or a speaker-embedding head, arXiv
    2210.16611), run by PyTorch (a ``finetune/<run>/`` directory) or onnxruntime (a ``speechkd export`` of it); see
    :func:`load`.

    Args:
      infer: ``list of (S,) 16 kHz float32 waveforms -> {"kws_logits": (N, K), "sv_embeddings": (N, D)}`` (the
        model's tasks only).
      tasks: ``("kws",)``, ``("sv",)`` or both.
      labels: KWS class names by index.
      min_samples: shortest waveform the model takes (16 kHz samples); max_seconds: longest audio accepted.
      backend: ``"pytorch"`` or ``"onnx"`` (for messages).
    """

    def __init__(self, infer, tasks: Sequence[str], labels: Sequence[str], min_samples: int = 1,
                 max_seconds: float = 30.0, backend: str = "pytorch"):
        self._infer, self.tasks, self.labels = infer, tuple(tasks), list(labels)
        self.min_samples, self.max_seconds, self.backend = int(min_samples), float(max_seconds), backend

    def _run(self, audio, sampling_rate, task: str) -> tuple[bool, np.ndarray]:
        if task not in self.tasks:
            what = {"kws": "keyword-spotting", "sv": "speaker-embedding"}[task]
            raise ValueError(f"this model has no {what} head (its tasks: {', '.join(self.tasks)}); load a {task} or "
                             "multitask run")
        single = isinstance(audio, (str, os.PathLike)) or (isinstance(audio, np.ndarray) and audio.ndim == 1)
        items = [audio] if single else list(audio)
        wavs = []
        for a in items:
            w = read_audio(a, sampling_rate, self.max_seconds)
            if w.size < self.min_samples:
                name = str(a) if isinstance(a, (str, os.PathLike)) else "array"
                raise ValueError(f"{name}: {w.size / SAMPLE_RATE:.3f} s of audio is shorter than this model takes "
                                 f"({self.min_samples / SAMPLE_RATE:.3f} s)")
            wavs.append(w)
        key = "kws_logits" if task == "kws" else "sv_embeddings"
        return single, np.asarray(self._infer(wavs)[key])

    def class_scores(self, audio: Union[Audio, Sequence[Audio]], sampling_rate: Optional[int] = None) -> np.ndarray:
        """KWS logits: ``(K,)`` for one input, ``(N, K)`` for a list (class order :attr:`labels`).

        Raises:
          ValueError: no KWS head; or as :func:`read_audio`, and audio shorter than :attr:`min_samples`."""
        single, logits = self._run(audio, sampling_rate, "kws")
        return logits[0] if single else logits

    def classify(self, audio: Union[Audio, Sequence[Audio]], sampling_rate: Optional[int] = None
                 ) -> Union[str, list[str]]:
        """The keyword (one of :attr:`labels`, e.g. ``"yes"``, ``"_unknown_"``) of one input, or of each of a list.

        Raises:
          as :meth:`class_scores`."""
        single, logits = self._run(audio, sampling_rate, "kws")
        names = [self.labels[int(i)] for i in logits.argmax(-1)]
        return names[0] if single else names

    def embed(self, audio: Union[Audio, Sequence[Audio]], sampling_rate: Optional[int] = None) -> np.ndarray:
        """Speaker embedding(s): ``(D,)`` for one input, ``(N, D)`` for a list (x-vector head, not normalised).

        Raises:
          ValueError: no speaker head; or as :meth:`class_scores`."""
        single, emb = self._run(audio, sampling_rate, "sv")
        return emb[0] if single else emb

    def verify(self, enrol: Audio, test: Audio, sampling_rate: Optional[int] = None) -> float:
        """Cosine similarity in [-1, 1] of two recordings' speaker embeddings (the evaluation's trial score: higher
        is more likely the same speaker; pick a threshold on your own trials, e.g. at the EER).

        Raises:
          as :meth:`embed`."""
        from speechkd.eval.verification import cosine_scores

        emb = self.embed([enrol, test], sampling_rate)
        return float(cosine_scores(emb[:1].astype(np.float64), emb[1:].astype(np.float64))[0])


def _load_ssl(model_dir: Path, onnx: bool, int8: bool, num_threads: int, max_seconds: float) -> SslModel:
    """:class:`SslModel` of a fine-tuning run directory (PyTorch) or an SSL export (onnxruntime)."""
    if onnx:
        from speechkd.export import load_onnx

        m = load_onnx(model_dir, int8=int8, num_threads=num_threads)
        max_s = max_seconds if m.max_samples is None else min(max_seconds, m.max_samples / SAMPLE_RATE)
        return SslModel(m.infer, m.tasks, m.labels, m.min_samples, max_s, backend="onnx")
    import torch

    from speechkd.data.classification import KWS_CLASSES
    from speechkd.export import pad_features, ssl_min_samples
    from speechkd.models.downstream import load_downstream

    torch.set_num_threads(int(num_threads))
    model = load_downstream(model_dir)
    hi = getattr(model.encoder, "max_samples", None)

    def infer(wavs):
        x, lens = pad_features([w[:, None] for w in wavs])
        out = model.infer(torch.from_numpy(x[..., 0]), torch.from_numpy(lens))
        return {k: v.numpy() for k, v in out.items()}

    max_s = max_seconds if hi is None else min(max_seconds, hi / SAMPLE_RATE)
    return SslModel(infer, model.tasks, KWS_CLASSES, ssl_min_samples(model), max_s)


def _find_tokenizer(model_dir: Path) -> Path:
    for cand in (model_dir / "tokens.model", model_dir.parent.parent / "lang" / "tokens.model",
                 model_dir.parent / "lang" / "tokens.model"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no tokenizer for {model_dir}: expected tokens.model in it or in the experiment's lang/ "
                            "(or export it: speechkd export writes tokens.txt)")


def load(model_dir: Pathlike, onnx: Optional[bool] = None, int8: bool = False, num_threads: int = 1,
         max_seconds: float = 60.0, beam: int = 1) -> Union[Transcriber, SslModel]:
    """A :class:`Transcriber` (greedy search, or beam search with ``beam`` > 1) from a trained ASR run or its ONNX
    export, transducer or AED; or an :class:`SslModel` (KWS / speaker verification) from an SSL recipe's fine-tuning
    run (``finetune/<run>/``, with ``downstream.json``) or its export (``model.onnx``).

    Args:
      model_dir: ``students/<run>/`` / ``teacher/`` of an experiment, or ``finetune/<run>/`` of an SSL experiment
        (PyTorch), or a ``speechkd export`` directory.
      onnx: use the ONNX graphs (default: when the directory holds ``encoder.onnx`` or ``model.onnx``).
      int8: the ``*.int8.onnx`` graphs (ONNX only).
      num_threads: CPU threads.
      max_seconds: longest audio accepted.
      beam: beam width of the search (1: greedy; > 1: the PyTorch model's beam search, modified beam search for a
        transducer, :func:`speechkd.decoding.nbest_search`; the ONNX runners decode greedily only).

    Raises:
      FileNotFoundError: no model, graphs or tokenizer in ``model_dir`` (naming what is missing).
      ValueError: a model that is neither a transducer nor an AED, tokens that do not fit it, ``beam`` < 1, or
        ``beam`` > 1 with the ONNX graphs or an SSL model.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    from speechkd.models.downstream import DOWNSTREAM_META

    if onnx is None:
        onnx = (model_dir / "encoder.onnx").is_file() or (model_dir / "model.onnx").is_file()
    if (model_dir / DOWNSTREAM_META).is_file() or (onnx and (model_dir / "model.onnx").is_file()):
        if beam > 1:
            raise ValueError(f"{model_dir} is an SSL model (keyword spotting / speaker embeddings): beam search "
                             "does not apply")
        return _load_ssl(model_dir, onnx, int8, num_threads, max_seconds)
    if onnx and beam > 1:
        raise ValueError(f"beam search (beam {beam}) runs on the PyTorch model only; the ONNX graphs of {model_dir} "
                         "decode greedily: give the trained run's folder, or beam 1")
    if onnx:
        from speechkd.export import load_onnx

        m = load_onnx(model_dir, int8=int8, num_threads=num_threads)
        return Transcriber(m.transcribe_features, m.tokens, max_seconds, backend="onnx")
    import torch

    from speechkd.data.tokenizer import Tokenizer
    from speechkd.models.aed import AttentionEncoderDecoder
    from speechkd.models.build import load_model
    from speechkd.models.transducer import Transducer

    torch.set_num_threads(int(num_threads))
    model, _ = load_model(model_dir)
    if isinstance(model, AttentionEncoderDecoder):
        from speechkd.decoding.aed import greedy_search
    elif isinstance(model, Transducer):
        from speechkd.decoding.transducer import greedy_search
    else:
        raise ValueError(f"{model_dir} holds a {type(model).__name__}; transcribe takes transducers and AED models")
    tok = Tokenizer(_find_tokenizer(model_dir))
    if tok.vocab_size != model.vocab_size:
        raise ValueError(f"the tokenizer of {model_dir} has {tok.vocab_size} tokens, the model {model.vocab_size}")

    def decode(feats):
        from speechkd.export import pad_features

        x, lens = pad_features(feats)
        with torch.no_grad():
            enc, enc_lens, _ = model.encode(torch.from_numpy(x), torch.from_numpy(lens))
            if beam == 1:
                return greedy_search(model, enc, enc_lens)
            from speechkd.decoding import nbest_search

            return [nb[0][0] for nb in nbest_search(model, enc, enc_lens, beam=beam)]

    return Transcriber(decode, [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)], max_seconds)
