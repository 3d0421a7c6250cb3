"""Export a transducer (student or teacher) to ONNX in the layout sherpa-onnx loads, and run it with onnxruntime.

The layout is icefall's (``export-onnx.py``) as sherpa-onnx's offline transducer reads it:

- ``encoder.onnx``: ``x (N, T, 80)`` float fbank, ``x_lens (N,)`` int64 frames -> ``encoder_out (N, T', J)`` (the
  encoder followed by the joiner's encoder projection), ``encoder_out_lens (N,)`` int64;
- ``decoder.onnx``: ``y (N, context_size)`` int64 -> ``decoder_out (N, J)`` (the stateless predictor's last position
  followed by the joiner's decoder projection); a negative id is read as blank, since sherpa-onnx starts decoding
  from the context ``[-1, blank]`` where speechkd starts from ``[blank, blank]``;
- ``joiner.onnx``: ``encoder_out (N, J)``, ``decoder_out (N, J)`` -> ``logit (N, V)``;
- ``tokens.txt``: ``piece id`` per line (``<blk> 0`` first);
- metadata (``onnx`` ``metadata_props``): the decoder's ``vocab_size`` and ``context_size`` (sherpa-onnx requires
  them), the joiner's ``joiner_dim``, and on every graph ``model_type``, ``model_author``, ``comment``.

With ``int8=True`` each graph also gets an ``*.int8.onnx`` made by onnxruntime's dynamic quantisation (weights int8,
activations quantised on the fly). Graphs come from ``torch.onnx.export`` (the dynamo exporter, dynamic batch and time
axes, a sample batch of 2); the model's input checks are skipped while tracing (:func:`speechkd.models.conformer.tracing`)
and :class:`OnnxTransducer` checks the inputs instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from speechkd.utils import Pathlike, atomic_dir

__all__ = ["AED_GRAPHS", "GRAPHS", "SSL_GRAPH", "SSL_OUTPUTS", "OnnxAed", "OnnxSsl", "OnnxTransducer", "check_export",
           "check_sherpa_onnx", "check_ssl_export", "export_aed", "export_model", "export_ssl", "export_transducer",
           "graph_bytes", "load_onnx", "measure_deployed", "pad_features", "ssl_min_samples", "write_tokens"]

GRAPHS = ("encoder", "decoder", "joiner")
"""The graphs of an exported transducer, in file order (``<name>.onnx``, ``<name>.int8.onnx``)."""

AED_GRAPHS = ("encoder", "decoder")
"""The graphs of an exported attention encoder-decoder (no sherpa-onnx layout exists for speechkd's AED)."""

_OPSET = 18


class _EncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder, self.proj = model.encoder, model.joiner.encoder_proj

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor):
        out, out_lens, _ = self.encoder(x, x_lens)  # (N, T', C), (N,)
        return self.proj(out), out_lens  # (N, T', J)


class _DecoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.decoder, self.proj, self.blank = model.decoder, model.joiner.decoder_proj, int(model.blank_id)

    def forward(self, y: torch.Tensor):
        y = torch.where(y < 0, torch.full_like(y, self.blank), y)  # sherpa-onnx's -1 start context -> blank
        out = self.decoder(y, need_pad=False)[:, -1]  # (N, D): the predictor after the context
        return self.proj(out)  # (N, J)


class _JoinerGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.output_linear = model.joiner.output_linear

    def forward(self, encoder_out: torch.Tensor, decoder_out: torch.Tensor):
        return self.output_linear(torch.tanh(encoder_out + decoder_out))  # (N, V)


def _input_dim(model) -> int:
    """Feature dim F the model's Conformer front end takes (80 fbank bins as built by speechkd)."""
    embed = model.encoder.embed
    return int(embed.conv[0].in_channels if len(embed.conv) else embed.out.in_features)


def write_tokens(tokenizer, path: Pathlike) -> Path:
    """``tokens.txt`` of a :class:`speechkd.data.tokenizer.Tokenizer`: one ``piece id`` line per token (``<blk> 0``
    first), as sherpa-onnx and icefall read it."""
    path = Path(path)
    lines = [f"{tokenizer.sp.id_to_piece(i)} {i}" for i in range(tokenizer.vocab_size)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _add_metadata(path: Path, meta: dict) -> None:
    """Set the graph's ``metadata_props`` and store its weights inside the file (the exporter may leave them in
    ``<file>.data``; sherpa-onnx reads one file per graph)."""
    import onnx

    model = onnx.load(str(path))  # external data loaded too
    del model.metadata_props[:]
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = str(key), str(value)
    onnx.save(model, str(path), save_as_external_data=False)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()


def export_transducer(model, tokenizer, out_dir: Pathlike, int8: bool = False, comment: str = "",
                      overwrite: bool = False) -> dict[str, Path]:
    """Export a transducer to ``out_dir`` in sherpa-onnx's offline layout (see the module docs), atomically.

    Args:
      model: a :class:`speechkd.models.transducer.Transducer` (e.g. ``load_model(student_dir)[0]``), in eval mode.
      tokenizer: its :class:`speechkd.data.tokenizer.Tokenizer` (``tokens.txt``).
      out_dir: the directory to write (must not exist unless ``overwrite``).
      int8: also write dynamically quantised ``*.int8.onnx`` graphs.
      comment: stored in every graph's metadata (e.g. the run it came from).
      overwrite: replace an existing ``out_dir``.

    Returns:
      ``{"encoder": path, "decoder": ..., "joiner": ..., "tokens": ...}`` (plus ``"<graph>.int8"`` with ``int8``).

    Raises:
      TypeError: ``model`` is not a transducer.
      ValueError: its vocabulary does not match the tokenizer's.
      FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    from speechkd.models.transducer import Transducer

    if not isinstance(model, Transducer):
        raise TypeError(f"export_transducer needs a Transducer, got {type(model).__name__}")
    if model.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the model has {model.vocab_size} output symbols, the tokenizer {tokenizer.vocab_size}")
    out_dir = Path(out_dir)
    model = model.eval()
    c, j = int(model.decoder.context_size), int(model.joiner.joiner_dim)
    common = {"model_type": "speechkd_conformer_transducer", "model_author": "speechkd", "comment": comment}
    n_dim, t_dim = torch.export.Dim("N", min=1, max=1024), torch.export.Dim("T", min=16, max=1_000_000)
    x = torch.randn(2, 200, _input_dim(model))
    y = torch.zeros(2, c, dtype=torch.long)
    y[0, 0] = -1  # sherpa-onnx's start context
    specs = {
        "encoder": (_EncoderGraph(model), (x, torch.tensor([200, 150])), ["x", "x_lens"],
                    ["encoder_out", "encoder_out_lens"], {"x": {0: n_dim, 1: t_dim}, "x_lens": {0: n_dim}}, {}),
        "decoder": (_DecoderGraph(model), (y,), ["y"], ["decoder_out"],
                    {"y": {0: n_dim}}, {"vocab_size": model.vocab_size, "context_size": c}),
        "joiner": (_JoinerGraph(model), (torch.randn(2, j), torch.randn(2, j)), ["encoder_out", "decoder_out"],
                   ["logit"], {"encoder_out": {0: n_dim}, "decoder_out": {0: n_dim}}, {"joiner_dim": j}),
    }
    return _export_graphs(specs, out_dir, tokenizer, int8, common,
                          {"arch": "transducer", "context_size": c, "joiner_dim": j, "vocab_size": model.vocab_size},
                          overwrite)


class _AedEncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor):
        out, out_lens, _ = self.encoder(x, x_lens)
        return out, out_lens  # (N, T', C), (N,)


class _AedDecoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, encoder_out, encoder_out_lens, ys, ys_lens):
        return self.decoder(encoder_out, encoder_out_lens, ys, ys_lens)  # (N, U, V)


def _export_graphs(specs: dict, out_dir: Path, tokenizer, int8: bool, common: dict, extra: dict,
                   overwrite: bool, texts: Optional[dict] = None) -> dict[str, Path]:
    """Export each ``name -> (module, sample args, input names, output names, dynamic shapes, metadata)`` into
    ``out_dir`` atomically (plus ``*.int8.onnx``, ``tokens.txt`` when a tokenizer is given, each ``texts`` file name
    -> content, and ``export.json``)."""
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists: pass overwrite=True (--overwrite) to replace it")
    paths: dict[str, Path] = {}
    with atomic_dir(out_dir) as tmp, torch.no_grad():
        for name, (graph, args, inputs, outputs, dynamic, meta) in specs.items():
            path = tmp / f"{name}.onnx"
            torch.onnx.export(graph, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_shapes=dynamic, dynamo=True, opset_version=_OPSET, verbose=False)
            _add_metadata(path, {**common, **meta})
            paths[name] = out_dir / path.name
            if int8:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                q = tmp / f"{name}.int8.onnx"
                quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8)
                _add_metadata(q, {**common, **meta})
                paths[f"{name}.int8"] = out_dir / q.name
        if tokenizer is not None:
            write_tokens(tokenizer, tmp / "tokens.txt")
            paths["tokens"] = out_dir / "tokens.txt"
        for fname, text in (texts or {}).items():
            (tmp / fname).write_text(text, encoding="utf-8")
            paths[Path(fname).stem] = out_dir / fname
        tmp.chmod(0o755)
        (tmp / "export.json").write_text(json.dumps({**extra, "int8": int8, "comment": common["comment"]},
                                                    indent=2) + "\n")
    return paths


def export_aed(model, tokenizer, out_dir: Pathlike, int8: bool = False, comment: str = "",
               overwrite: bool = False) -> dict[str, Path]:
    """Export an attention encoder-decoder: ``encoder.onnx`` (``x (N, T, 80)``, ``x_lens (N,)`` -> ``encoder_out
    (N, T', C)``, ``encoder_out_lens (N,)``) and ``decoder.onnx`` (``encoder_out``, ``encoder_out_lens``, ``ys (N, U)``
    int64 with ``[sos] + prefix``, ``ys_lens (N,)`` -> ``logits (N, U, V)``), ``tokens.txt`` (id 0 = sos/eos/blank),
    optionally int8; metadata ``model_type``, ``vocab_size``, ``sos_id``, ``eos_id``. Atomic.

    Raises:
      TypeError: not an :class:`speechkd.models.aed.AttentionEncoderDecoder`. ValueError: vocabulary mismatch.
      FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    from speechkd.models.aed import AttentionEncoderDecoder

    if not isinstance(model, AttentionEncoderDecoder):
        raise TypeError(f"export_aed needs an AttentionEncoderDecoder, got {type(model).__name__}")
    if model.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the model has {model.vocab_size} output symbols, the tokenizer {tokenizer.vocab_size}")
    model = model.eval()
    f = _input_dim(model)
    n, t, u = (torch.export.Dim("N", min=1, max=1024), torch.export.Dim("T", min=16, max=1_000_000),
               torch.export.Dim("U", min=1, max=4096))
    tt = torch.export.Dim("T_enc", min=1, max=1_000_000)
    c = int(model.decoder.encoder_dim)
    meta = {"vocab_size": model.vocab_size, "sos_id": model.sos_id, "eos_id": model.eos_id}
    specs = {
        "encoder": (_AedEncoderGraph(model), (torch.randn(2, 200, f), torch.tensor([200, 150])), ["x", "x_lens"],
                    ["encoder_out", "encoder_out_lens"], {"x": {0: n, 1: t}, "x_lens": {0: n}}, {}),
        "decoder": (_AedDecoderGraph(model), (torch.randn(2, 40, c), torch.tensor([40, 30]),
                                              torch.tensor([[0, 3, 4], [0, 5, 0]]), torch.tensor([3, 2])),
                    ["encoder_out", "encoder_out_lens", "ys", "ys_lens"], ["logits"],
                    {"encoder_out": {0: n, 1: tt}, "encoder_out_lens": {0: n}, "ys": {0: n, 1: u},
                     "ys_lens": {0: n}}, meta),
    }
    common = {"model_type": "speechkd_conformer_aed", "model_author": "speechkd", "comment": comment}
    return _export_graphs(specs, Path(out_dir), tokenizer, int8, common, {**meta, "arch": "aed"}, overwrite)


def export_model(model, tokenizer, out_dir: Pathlike, **kwargs) -> dict[str, Path]:
    """:func:`export_transducer` or :func:`export_aed`, by the model's class.

    Raises:
      TypeError: neither a transducer nor an AED; or as the exporter.
    """
    from speechkd.models.aed import AttentionEncoderDecoder

    if isinstance(model, AttentionEncoderDecoder):
        return export_aed(model, tokenizer, out_dir, **kwargs)
    return export_transducer(model, tokenizer, out_dir, **kwargs)


SSL_GRAPH = "model"
"""The single graph of an exported SSL downstream model (``model.onnx``, ``model.int8.onnx``)."""

SSL_OUTPUTS = {"kws": "kws_logits", "sv": "sv_embeddings"}
"""The SSL graph's output per task (the names :meth:`speechkd.models.downstream.DownstreamModel.forward` returns)."""


class _SslGraph(nn.Module):
    """``wavs (N, S)`` (one length, no padding) -> each task's output, in :data:`SSL_OUTPUTS` order."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, wavs: torch.Tensor):
        lens = torch.full((wavs.shape[0],), wavs.shape[1], dtype=torch.long, device=wavs.device)
        out = self.model(wavs, lens)
        return tuple(out[SSL_OUTPUTS[t]] for t in SSL_OUTPUTS if SSL_OUTPUTS[t] in out)


def ssl_min_samples(model) -> int:
    """Shortest input (samples at 16 kHz) every head of a downstream model takes: the encoder's one frame, or for
    an SV head with 'valid' TDNN padding its ``min_frames`` encoder frames."""
    enc = model.encoder
    need = int(getattr(model.sv, "min_frames", 1)) if model.sv is not None else 1
    cand = torch.arange(int(enc.min_samples), int(enc.min_samples) + (need + 1) * int(enc.samples_per_frame) + 1)
    ok = torch.nonzero(enc.frame_lens(cand) >= need)
    return int(cand[int(ok[0])])


def export_ssl(model, out_dir: Pathlike, int8: bool = False, comment: str = "", overwrite: bool = False,
               labels: Sequence[str] = ()) -> dict[str, Path]:
    """Export an SSL downstream model (an encoder with its KWS and / or speaker-embedding head, arXiv 2210.16611) as
    one graph ``model.onnx``: ``wavs (N, S)`` float 16 kHz samples, N utterances of the same length S (no padding:
    exact, as the PyTorch model on each utterance alone) -> ``kws_logits (N, 12)`` and / or ``sv_embeddings (N, D)``
    (x-vector embeddings for cosine scoring). Also ``labels.txt`` (the KWS classes, one per line, with a KWS head),
    ``export.json`` (``arch: ssl``, tasks, outputs, ``min_samples`` / ``max_samples``) and optionally
    ``model.int8.onnx``. Atomic. :class:`OnnxSsl` runs it.

    Args:
      model: a :class:`speechkd.models.downstream.DownstreamModel` (e.g. ``load_downstream(run_dir)``).
      out_dir: the directory to write (must not exist unless ``overwrite``).
      int8: also write a dynamically quantised ``model.int8.onnx``.
      comment: stored in the graph's metadata.
      overwrite: replace an existing ``out_dir``.
      labels: the KWS class names by index (default :data:`speechkd.data.classification.KWS_CLASSES`).

    Returns:
      ``{"model": path, "labels": ...}`` (plus ``"model.int8"``).

    Raises:
      TypeError: not a DownstreamModel. ValueError: labels that do not match the KWS head.
      FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    from speechkd.models.downstream import DownstreamModel

    if not isinstance(model, DownstreamModel):
        raise TypeError(f"export_ssl needs a DownstreamModel, got {type(model).__name__}")
    model = model.eval()
    texts = {}
    if model.kws is not None:
        if not labels:
            from speechkd.data.classification import KWS_CLASSES as labels
        if len(labels) != model.kws.classifier.out_features:
            raise ValueError(f"{len(labels)} labels for a KWS head of {model.kws.classifier.out_features} classes")
        texts["labels.txt"] = "".join(f"{c}\n" for c in labels)
    enc = model.encoder
    lo, hi = ssl_min_samples(model), getattr(enc, "max_samples", None)
    s = max(16000, 2 * lo) if hi is None else min(max(16000, 2 * lo), int(hi))
    outputs = [SSL_OUTPUTS[t] for t in SSL_OUTPUTS if t in model.tasks]
    auto = torch.export.Dim.AUTO  # explicit Dims fail: export cannot prove the frame arithmetic's guards over a range
    specs = {SSL_GRAPH: (_SslGraph(model).eval(), (0.1 * torch.randn(2, s),), ["wavs"], outputs,
                         {"wavs": {0: auto, 1: auto}}, {"tasks": ",".join(model.tasks)})}
    common = {"model_type": "speechkd_ssl_downstream", "model_author": "speechkd", "comment": comment}
    extra = {"arch": "ssl", "tasks": list(model.tasks), "outputs": outputs, "sample_rate": 16000,
             "min_samples": lo, "max_samples": None if hi is None else int(hi),
             "embed_dim": None if model.sv is None else int(model.sv.embed_dim)}
    return _export_graphs(specs, Path(out_dir), None, int8, common, extra, overwrite, texts=texts)


def _sessions(model_dir: Path, graphs: Sequence[str], int8: bool, num_threads: int) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = int(num_threads)
    sessions = {}
    for name in graphs:
        path = model_dir / (f"{name}.int8.onnx" if int8 else f"{name}.onnx")
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no {path.name} (export with speechkd export"
                                    f"{' --int8' if int8 else ''})")
        sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sessions


def _tokens(model_dir: Path, vocab_size: int) -> list[str]:
    tokens = model_dir / "tokens.txt"
    if not tokens.is_file():
        raise FileNotFoundError(f"{model_dir} has no tokens.txt")
    pieces = [line.rsplit(" ", 1)[0] for line in tokens.read_text(encoding="utf-8").splitlines() if line]
    if len(pieces) != vocab_size:
        raise ValueError(f"{tokens} lists {len(pieces)} tokens, the decoder has vocab_size {vocab_size}")
    return pieces


def _meta_ints(session, keys: Sequence[str], model_dir: Path) -> list[int]:
    meta = session.get_modelmeta().custom_metadata_map
    try:
        return [int(meta[k]) for k in keys]
    except KeyError as e:
        raise ValueError(f"{model_dir}: decoder metadata lacks {e} (not exported by speechkd export)") from None


def _run_encoder(session, x, x_lens) -> tuple[np.ndarray, np.ndarray]:
    """An exported encoder on ``x (N, T, F)``, ``x_lens (N,)`` (checked) -> ``(encoder_out, encoder_out_lens)``."""
    x, x_lens = np.asarray(x, dtype=np.float32), np.asarray(x_lens, dtype=np.int64)
    if x.ndim != 3 or x_lens.shape != (x.shape[0],) or (x_lens > x.shape[1]).any():
        raise ValueError(f"x must be (N, T, F) and x_lens (N,) <= T, got {x.shape} and {x_lens.shape}")
    out, lens = session.run(None, {"x": x, "x_lens": x_lens})
    if (lens < 1).any():
        raise ValueError(f"an input of {int(x_lens.min())} frames is too short for the encoder")
    return out, lens


def pad_features(feats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(x (N, T_max, F) float32`` right-padded with zeros, ``x_lens (N,) int64)`` from N ``(T_n, F)`` matrices."""
    lens = np.array([f.shape[0] for f in feats], dtype=np.int64)
    x = np.zeros((len(feats), int(lens.max()), feats[0].shape[1]), dtype=np.float32)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
    return x, lens


class _OnnxAsr:
    """What both exported runners share: the graphs' sessions, the decoder's integer metadata, the tokens, the encoder
    call and batching. Subclasses set :attr:`graphs` and :attr:`meta_keys` (read into attributes) and ``greedy``."""

    graphs: tuple[str, ...] = ()
    meta_keys: tuple[str, ...] = ()

    def __init__(self, model_dir: Pathlike, int8: bool = False, num_threads: int = 1):
        self.dir = Path(model_dir)
        self.sessions = _sessions(self.dir, self.graphs, int8, num_threads)
        for key, value in zip(self.meta_keys, _meta_ints(self.sessions["decoder"], self.meta_keys, self.dir)):
            setattr(self, key, value)
        self.tokens = _tokens(self.dir, self.vocab_size)

    def encode(self, x: np.ndarray, x_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x (N, T, 80)`` float32 fbank, ``x_lens (N,)`` frames -> ``encoder_out (N, T', D)``, ``lens (N,)`` (for a
        transducer D is the joiner dim: the encoder projection is in the graph).

        Raises:
          ValueError: bad shapes, or an utterance too short for the encoder's subsampling.
        """
        return _run_encoder(self.sessions["encoder"], x, x_lens)

    def greedy(self, encoder_out: np.ndarray, lens: np.ndarray) -> list[list[int]]:
        raise NotImplementedError

    def transcribe_features(self, feats: Sequence[np.ndarray]) -> list[list[int]]:
        """Token ids of each ``(T, 80)`` fbank matrix (batched, right-padded)."""
        return self.greedy(*self.encode(*pad_features(feats)))


class OnnxTransducer(_OnnxAsr):
    """An exported transducer run by onnxruntime on the CPU: encoder frames and greedy decoding equal to
    :func:`speechkd.decoding.transducer.greedy_search` (one symbol per frame, the context starting all blank).

    Args:
      model_dir: a directory written by :func:`export_transducer`.
      int8: load the ``*.int8.onnx`` graphs.
      num_threads: onnxruntime intra-op threads.

    Raises:
      FileNotFoundError: a graph or ``tokens.txt`` is missing (naming it).
      ValueError: the decoder's metadata lacks ``vocab_size`` / ``context_size``, or ``tokens.txt`` disagrees with it.
    """

    graphs = GRAPHS
    meta_keys = ("vocab_size", "context_size")

    def greedy(self, encoder_out: np.ndarray, lens: np.ndarray) -> list[list[int]]:
        """Greedy search over projected encoder frames: one symbol per frame at most (speechkd's default)."""
        n = encoder_out.shape[0]
        hyps: list[list[int]] = [[] for _ in range(n)]
        contexts = np.zeros((n, self.context_size), dtype=np.int64)  # blank = 0
        dec = self.sessions["decoder"].run(None, {"y": contexts})[0]  # (N, J)
        for t in range(int(lens.max())):
            logits = self.sessions["joiner"].run(None, {"encoder_out": np.ascontiguousarray(encoder_out[:, t]),
                                                        "decoder_out": dec})[0]  # (N, V)
            tokens = logits.argmax(-1)
            emit = (t < lens) & (tokens != 0)
            if emit.any():
                for i in np.nonzero(emit)[0]:
                    hyps[i].append(int(tokens[i]))
                contexts = np.where(emit[:, None], np.concatenate([contexts[:, 1:], tokens[:, None]], 1), contexts)
                dec = np.where(emit[:, None], self.sessions["decoder"].run(None, {"y": contexts})[0], dec)
        return hyps



class OnnxAed(_OnnxAsr):
    """An exported attention encoder-decoder run by onnxruntime: greedy decoding equal to
    :func:`speechkd.decoding.aed.greedy_search` (argmax until eos, at most one token per encoder frame).

    Args / Raises: as :class:`OnnxTransducer` (metadata ``vocab_size``, ``sos_id``, ``eos_id``).
    """

    graphs = AED_GRAPHS
    meta_keys = ("vocab_size", "sos_id", "eos_id")

    def greedy(self, encoder_out: np.ndarray, lens: np.ndarray) -> list[list[int]]:
        """Argmax decoding until eos, an utterance stopping after as many tokens as it has encoder frames."""
        n = encoder_out.shape[0]
        hyps: list[list[int]] = [[] for _ in range(n)]
        active = lens > 0
        ys = np.full((n, 1), self.sos_id, dtype=np.int64)
        while active.any():
            step = ys.shape[1]
            logits = self.sessions["decoder"].run(None, {
                "encoder_out": encoder_out, "encoder_out_lens": lens.astype(np.int64), "ys": ys,
                "ys_lens": np.full((n,), step, dtype=np.int64)})[0][:, -1]  # (N, V)
            tokens = logits.argmax(-1)
            for i in np.nonzero(active)[0]:
                if tokens[i] == self.eos_id:
                    active[i] = False
                else:
                    hyps[i].append(int(tokens[i]))
                    active[i] = len(hyps[i]) < lens[i]
            ys = np.concatenate([ys, np.where(active, tokens, self.eos_id)[:, None]], 1)
        return hyps



class OnnxSsl:
    """An exported SSL downstream model (:func:`export_ssl`) run by onnxruntime on the CPU.

    Args:
      model_dir: a directory written by :func:`export_ssl`.
      int8: load ``model.int8.onnx``.
      num_threads: onnxruntime intra-op threads.

    Attributes:
      tasks: ``("kws",)``, ``("sv",)`` or both; labels: the KWS classes by index (empty without KWS);
      min_samples / max_samples: the input lengths the graph takes (max None: no limit).

    Raises:
      FileNotFoundError: the graph, ``export.json`` or ``labels.txt`` is missing (naming it).
      ValueError: ``export.json`` is not an SSL export, or ``labels.txt`` does not fit the graph.
    """

    def __init__(self, model_dir: Pathlike, int8: bool = False, num_threads: int = 1):
        self.dir = Path(model_dir)
        info = _export_info(self.dir)
        if info.get("arch") != "ssl":
            raise ValueError(f"{self.dir / 'export.json'} is not an SSL export (arch {info.get('arch')!r})")
        self.tasks = tuple(info["tasks"])
        self.outputs = list(info["outputs"])
        self.min_samples, self.max_samples = int(info["min_samples"]), info.get("max_samples")
        self.session = _sessions(self.dir, (SSL_GRAPH,), int8, num_threads)[SSL_GRAPH]
        self.labels: list[str] = []
        if "kws" in self.tasks:
            path = self.dir / "labels.txt"
            if not path.is_file():
                raise FileNotFoundError(f"{self.dir} has no labels.txt (the KWS classes)")
            self.labels = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
            n = self.session.get_outputs()[self.outputs.index("kws_logits")].shape[-1]
            if isinstance(n, int) and n != len(self.labels):
                raise ValueError(f"{path} lists {len(self.labels)} classes, the graph has {n}")

    def infer(self, wavs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Each head's output for N waveforms of any lengths (run in groups of equal length: no padding).

        Args:
          wavs: N ``(S_n,)`` float arrays of 16 kHz samples, each ``min_samples <= S_n <= max_samples``.

        Returns:
          ``{"kws_logits": (N, 12)}`` and / or ``{"sv_embeddings": (N, D)}`` float32, in input order.

        Raises:
          ValueError: an input that is not 1-D or is shorter / longer than the graph takes (naming its index).
        """
        wavs = [np.asarray(w, dtype=np.float32) for w in wavs]
        for i, w in enumerate(wavs):
            if w.ndim != 1:
                raise ValueError(f"input {i}: expected (S,) samples, got shape {w.shape}")
            if w.shape[0] < self.min_samples or (self.max_samples is not None and w.shape[0] > self.max_samples):
                raise ValueError(f"input {i}: {w.shape[0]} samples; this model takes {self.min_samples} to "
                                 f"{self.max_samples or 'any number of'} samples (16 kHz)")
        res: dict[str, np.ndarray] = {}
        for length in sorted({w.shape[0] for w in wavs}):
            idx = [i for i, w in enumerate(wavs) if w.shape[0] == length]
            outs = self.session.run(None, {"wavs": np.stack([wavs[i] for i in idx])})
            for name, out in zip(self.outputs, outs):
                if name not in res:
                    res[name] = np.zeros((len(wavs),) + out.shape[1:], dtype=np.float32)
                res[name][idx] = out
        return res


def _export_info(model_dir: Path) -> dict:
    path = model_dir / "export.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no export.json (not written by speechkd export)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None


def load_onnx(model_dir: Pathlike, int8: bool = False, num_threads: int = 1):
    """:class:`OnnxTransducer`, :class:`OnnxAed` or :class:`OnnxSsl` by the export's ``export.json`` (``arch``;
    transducer without the file).

    Raises:
      as the class.
    """
    info = Path(model_dir) / "export.json"
    arch = json.loads(info.read_text()).get("arch", "transducer") if info.is_file() else "transducer"
    cls = {"aed": OnnxAed, "ssl": OnnxSsl}.get(arch, OnnxTransducer)
    return cls(model_dir, int8=int8, num_threads=num_threads)


def check_ssl_export(model, onnx_dir: Pathlike, wavs: Sequence[np.ndarray], int8: bool = False) -> dict:
    """Compare an SSL export with its PyTorch model on waveforms: KWS logits (max abs difference and equal argmax)
    and speaker embeddings (max abs difference and the smallest cosine similarity between the two).

    Args:
      model: the :class:`~speechkd.models.downstream.DownstreamModel` that was exported.
      onnx_dir: its export (:func:`export_ssl`).
      wavs: ``(S_n,)`` float 16 kHz waveforms (e.g. test clips).
      int8: check ``model.int8.onnx`` instead.

    Returns:
      ``{"utterances", "kws_max_abs", "same_class", "sv_max_abs", "sv_min_cosine"}`` (None for an absent task).
    """
    from speechkd.eval.verification import cosine_scores

    onnx_model = OnnxSsl(onnx_dir, int8=int8)
    res = {"utterances": len(wavs), "kws_max_abs": None, "same_class": None, "sv_max_abs": None,
           "sv_min_cosine": None}
    out = onnx_model.infer(wavs)
    ref = {k: [] for k in out}
    for w in wavs:  # each alone: the reference is the PyTorch model on the utterance by itself
        r = model.eval().infer(torch.from_numpy(np.asarray(w, dtype=np.float32))[None], torch.tensor([len(w)]))
        for k in ref:
            ref[k].append(r[k][0].numpy())
    if "kws_logits" in out:
        r = np.stack(ref["kws_logits"])
        res.update(kws_max_abs=float(np.abs(out["kws_logits"] - r).max()),
                   same_class=int((out["kws_logits"].argmax(-1) == r.argmax(-1)).sum()))
    if "sv_embeddings" in out:
        r = np.stack(ref["sv_embeddings"])
        res.update(sv_max_abs=float(np.abs(out["sv_embeddings"] - r).max()),
                   sv_min_cosine=float(cosine_scores(out["sv_embeddings"].astype(np.float64), r.astype(np.float64)).min()))
    return res


def check_export(model, onnx_dir: Pathlike, cuts, int8: bool = False, batch: int = 16) -> dict:
    """Compare an export with its PyTorch model on cuts with fbank: encoder frames (fp32 only) and greedy hypotheses.

    Args:
      model: the transducer or AED that was exported.
      onnx_dir: its export (:func:`export_model`).
      cuts: cuts with the recipe's fbank (e.g. the test split).
      int8: check the ``*.int8.onnx`` graphs instead.
      batch: utterances per batch.

    Returns:
      ``{"utterances", "same_hypotheses", "encoder_max_abs"}`` (``encoder_max_abs`` over valid frames; None for int8).
    """
    from speechkd.models.aed import AttentionEncoderDecoder

    aed = isinstance(model, AttentionEncoderDecoder)
    if aed:
        from speechkd.decoding.aed import greedy_search
    else:
        from speechkd.decoding.transducer import greedy_search
    onnx_model = (OnnxAed if aed else OnnxTransducer)(onnx_dir, int8=int8)
    cuts = list(cuts)
    same, worst = 0, 0.0
    for start in range(0, len(cuts), batch):
        x, lens = pad_features([c.load_features() for c in cuts[start:start + batch]])
        with torch.no_grad():
            enc, enc_lens, _ = model.encode(torch.from_numpy(x), torch.from_numpy(lens))
            ref = greedy_search(model, enc, enc_lens)
            frames = (enc if aed else model.joiner.encoder_proj(enc)).numpy()
        out, out_lens = onnx_model.encode(x, lens)
        if not int8:
            worst = max(worst, max(float(np.abs(out[i, :k] - frames[i, :k]).max()) for i, k in enumerate(out_lens)))
        same += sum(a == b for a, b in zip(onnx_model.greedy(out, out_lens), ref))
    return {"utterances": len(cuts), "same_hypotheses": same, "encoder_max_abs": None if int8 else worst}


def check_sherpa_onnx(onnx_dir: Pathlike, cuts, num_threads: int = 1) -> dict:
    """Decode cuts' audio with sherpa-onnx (its own fbank, greedy search) from a transducer export and compare its
    tokens with onnxruntime's greedy search on speechkd's fbank of the same cuts.

    Args:
      onnx_dir: a transducer export (:func:`export_transducer`).
      cuts: cuts with audio (mono; resampled to 16 kHz here) and the recipe's fbank.
      num_threads: sherpa-onnx threads.

    Returns:
      ``{"utterances", "same_hypotheses"}``.

    Raises:
      ImportError: sherpa-onnx is not installed.
    """
    import sherpa_onnx

    d = Path(onnx_dir)
    rec = sherpa_onnx.OfflineRecognizer.from_transducer(
        encoder=str(d / "encoder.onnx"), decoder=str(d / "decoder.onnx"), joiner=str(d / "joiner.onnx"),
        tokens=str(d / "tokens.txt"), num_threads=num_threads, sample_rate=16000, feature_dim=80,
        decoding_method="greedy_search")
    ours = OnnxTransducer(d, num_threads=num_threads)
    same, cuts = 0, list(cuts)
    for cut in cuts:
        stream = rec.create_stream()
        stream.accept_waveform(16000, (cut if cut.sampling_rate == 16000 else cut.resample(16000)).load_audio()[0])
        rec.decode_stream(stream)
        mine = [ours.tokens[t].replace("\u2581", " ") for t in ours.transcribe_features([cut.load_features()])[0]]
        same += list(stream.result.tokens) == mine  # sherpa-onnx writes the word-boundary piece as a space
    return {"utterances": len(cuts), "same_hypotheses": same}


def graph_bytes(onnx_dir: Pathlike, int8: bool = False) -> int:
    """Bytes on disk of an export's fp32 graphs (``*.onnx`` but not ``*.int8.onnx``) or of its int8 graphs.

    Raises:
      FileNotFoundError: no such graph in ``onnx_dir``.
    """
    d = Path(onnx_dir)
    files = [p for p in d.glob("*.onnx") if p.name.endswith(".int8.onnx") == int8]
    if not files:
        raise FileNotFoundError(f"{d} has no {'int8' if int8 else 'fp32'} ONNX graphs")
    return sum(p.stat().st_size for p in files)


def measure_deployed(onnx_dir: Pathlike, tokenizer, test_feats: Sequence[np.ndarray], test_refs: Sequence[str],
                     rtf_feats: Sequence[np.ndarray], rtf_audio_seconds: float, normalizer=None,
                     num_threads: int = 1, batch: int = 16) -> dict:
    """The "as deployed" figures of an ASR export (transducer or AED), in fp32 and in int8: graph bytes, test WER of
    onnxruntime's greedy search, and its CPU real-time factor one utterance at a time.

    Args:
      onnx_dir: an export with both precisions (:func:`export_model` with ``int8=True``).
      tokenizer: the model's :class:`speechkd.data.tokenizer.Tokenizer` (ids -> text).
      test_feats: ``(T, 80)`` fbank of each test utterance; test_refs: their reference texts (normalised as
        ``normalizer`` leaves them).
      rtf_feats: fbank of the utterances timed for the RTF (feature extraction is not timed, as for the PyTorch RTF
        of ``speechkd evaluate``); rtf_audio_seconds: their total duration in seconds.
      normalizer: the data's text rule, applied to the hypotheses (None: as decoded).
      num_threads: onnxruntime threads (RTF and WER).
      batch: utterances per batch for the WER (right-padded; the encoder masks padding).

    Returns:
      ``{"fp32": {"bytes", "test_wer", "rtf"}, "int8": {...}}`` (WER in percent).

    Raises:
      FileNotFoundError: a graph of either precision is missing.
    """
    from speechkd.eval.metrics import word_error_rate
    from speechkd.eval.speed import real_time_factor

    out = {}
    for name, q in (("fp32", False), ("int8", True)):
        runner = load_onnx(onnx_dir, int8=q, num_threads=num_threads)
        hyps = []
        for start in range(0, len(test_feats), batch):
            hyps += tokenizer.decode(runner.transcribe_features(test_feats[start:start + batch]))
        if normalizer is not None:
            hyps = [normalizer(h) for h in hyps]
        rtf = real_time_factor(lambda f: runner.transcribe_features([f]), rtf_feats, audio_seconds=rtf_audio_seconds)
        out[name] = {"bytes": graph_bytes(onnx_dir, int8=q), "test_wer": word_error_rate(list(test_refs), hyps).wer,
                     "rtf": rtf}
    return out
