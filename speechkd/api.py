"""Use a trained ASR model (transducer or attention encoder-decoder): ``speechkd.load(model_dir).transcribe(audio)``.

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

__all__ = ["SAMPLE_RATE", "Transcriber", "load", "read_audio"]

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


def _find_tokenizer(model_dir: Path) -> Path:
    for cand in (model_dir / "tokens.model", model_dir.parent.parent / "lang" / "tokens.model",
                 model_dir.parent / "lang" / "tokens.model"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no tokenizer for {model_dir}: expected tokens.model in it or in the experiment's lang/ "
                            "(or export it: speechkd export writes tokens.txt)")


def load(model_dir: Pathlike, onnx: Optional[bool] = None, int8: bool = False, num_threads: int = 1,
         max_seconds: float = 60.0) -> Transcriber:
    """A :class:`Transcriber` (greedy search) from a trained run or an ONNX export, transducer or AED.

    Args:
      model_dir: ``students/<run>/`` / ``teacher/`` of an experiment (PyTorch), or a ``speechkd export`` directory.
      onnx: use the ONNX graphs (default: when the directory holds ``encoder.onnx``).
      int8: the ``*.int8.onnx`` graphs (ONNX only).
      num_threads: CPU threads.
      max_seconds: longest audio accepted.

    Raises:
      FileNotFoundError: no model, graphs or tokenizer in ``model_dir`` (naming what is missing).
      ValueError: a model that is neither a transducer nor an AED, or tokens that do not fit it.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if onnx is None:
        onnx = (model_dir / "encoder.onnx").is_file()
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
            return greedy_search(model, enc, enc_lens)

    return Transcriber(decode, [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)], max_seconds)
