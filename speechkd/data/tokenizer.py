"""Sentencepiece tokens trained on the training transcripts, with blank at id 0 (transducer convention)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from speechkd.utils import Pathlike, atomic_path

BLANK = "<blk>"


def train_tokenizer(texts: Iterable[str], model_path: Pathlike, vocab_size: int = 64, model_type: str = "unigram") -> Path:
    """Train a sentencepiece model on ``texts`` and write ``model_path`` atomically.

    Id 0 is ``<blk>`` (the transducer blank), id 1 is ``<unk>``; no BOS/EOS/pad. With a small text the
    vocabulary may come out smaller than ``vocab_size`` (``hard_vocab_limit=False``).

    Args:
      texts: transcripts, one per utterance.
      model_path: output ``.model`` file.
      vocab_size: requested vocabulary size including ``<blk>`` and ``<unk>``.
      model_type: sentencepiece model type (``unigram``, ``bpe``, ``word``, ``char``).

    Returns:
      the model path.

    Raises:
      ValueError: when ``texts`` is empty or ``vocab_size`` cannot hold every character.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no transcripts to train the tokenizer on")
    chars = {ch for t in texts for ch in t.replace(" ", "")}
    needed = len(chars) + 3  # the characters, the word-boundary piece, <blk>, <unk>
    if vocab_size < needed:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: the transcripts use {len(chars)} characters, so at least "
            f"{needed} tokens are needed"
        )
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    txt = model_path.with_suffix(".train.txt")
    txt.write_text("\n".join(texts) + "\n", encoding="utf-8")
    with atomic_path(model_path) as tmp:
        prefix = str(tmp)[: -len(".model")]  # sentencepiece writes <prefix>.model, i.e. tmp itself
        spm.SentencePieceTrainer.train(
            input=str(txt),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            user_defined_symbols=[BLANK],
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        vocab = Path(prefix + ".vocab")
        if vocab.exists():
            vocab.replace(model_path.with_suffix(".vocab"))
    txt.unlink()
    return model_path


class Tokenizer:
    """A loaded sentencepiece model: text <-> token ids, blank at id 0.

    Args:
      model_path: the ``.model`` file written by :func:`train_tokenizer`.

    Raises:
      FileNotFoundError: missing model file.
      ValueError: the model does not have ``<blk>`` at id 0.
    """

    def __init__(self, model_path: Pathlike):
        import sentencepiece as spm

        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        if self.sp.id_to_piece(0) != BLANK:
            raise ValueError(f"{model_path}: id 0 is '{self.sp.id_to_piece(0)}', expected '{BLANK}'")
        self.blank_id = 0

    @property
    def vocab_size(self) -> int:
        """Number of tokens including blank."""
        return self.sp.get_piece_size()

    def vocabulary(self) -> list[tuple[str, float]]:
        """``[(piece, score), ...]`` by id: what decides how text is split (two tokenizers trained on the same text
        with the same settings have the same vocabulary, though their files differ in the paths they record)."""
        return [(self.sp.id_to_piece(i), self.sp.get_score(i)) for i in range(self.vocab_size)]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> token id lists (no blank inside)."""
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Token id lists -> texts (blank ids are dropped)."""
        return [self.sp.decode([i for i in seq if i != self.blank_id]) for seq in ids]
