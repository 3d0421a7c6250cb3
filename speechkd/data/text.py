"""Transcript normalisation: one rule, applied the same way to tokenizer training, training targets and WER.

The rule (:func:`normalize_text`, settings in :class:`speechkd.config.TextConfig`):

1. Unicode NFKC (compatibility forms folded: full-width letters, ligatures, non-breaking spaces);
2. format characters (Unicode category ``Cf``: zero-width spaces and joiners, byte-order marks) removed;
3. ``lowercase``: lower case;
4. ``strip_punctuation``: every character that is neither a letter, a digit, a space nor an apostrophe between
   two letters/digits becomes a space ("don't" stays, "'quoted'" loses its quotes, "well,then" -> "well then");
5. whitespace runs collapse to one space, ends stripped.

A normalised transcript that is empty, or holds a character outside the configured alphabet (default ``a-z0-9'``),
is bad input: :func:`check_text` says why, and the data stage reports or skips the row.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Optional

_SPACES = re.compile(r"\s+")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def normalize_text(text: str, lowercase: bool = True, strip_punctuation: bool = True, spell_digits: bool = False
                   ) -> str:
    """Normalise one transcript by the rule of this module's docstring.

    Args:
      text: a raw transcript.
      lowercase: fold to lower case.
      strip_punctuation: replace punctuation and symbols by spaces (in-word apostrophes kept).
      spell_digits: write every ASCII digit as its word, one word per digit ("924" -> "nine two four"; for
        connected-digit tasks, where a teacher such as Whisper writes numbers as digits).

    Returns:
      the normalised transcript ('' when nothing is left).
    """
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    if lowercase:
        text = text.lower()
    if strip_punctuation:
        chars = list(text)
        for i, ch in enumerate(chars):
            if ch.isalnum() or ch.isspace():
                continue
            if ch == "'" and 0 < i < len(chars) - 1 and chars[i - 1].isalnum() and chars[i + 1].isalnum():
                continue
            chars[i] = " "
        text = "".join(chars)
    if spell_digits:
        text = "".join(f" {_DIGIT_WORDS[int(ch)]} " if "0" <= ch <= "9" else ch for ch in text)
    return _SPACES.sub(" ", text).strip()


class TextNormalizer:
    """The recipe's normalisation rule and alphabet, callable on a transcript.

    Args:
      lowercase / strip_punctuation: as :func:`normalize_text`.
      alphabet: body of a regex character class of the characters allowed besides the space (e.g. ``a-z0-9'``);
        None allows every character.
      spell_digits: as :func:`normalize_text`.

    Raises:
      ValueError: ``alphabet`` is not a valid character-class body.
    """

    def __init__(self, lowercase: bool = True, strip_punctuation: bool = True, alphabet: Optional[str] = "a-z0-9'",
                 spell_digits: bool = False):
        self.lowercase = lowercase
        self.strip_punctuation = strip_punctuation
        self.spell_digits = spell_digits
        self.alphabet = alphabet
        self._outside = None if alphabet is None else re.compile(f"[^{alphabet} ]")

    @classmethod
    def from_config(cls, cfg) -> "TextNormalizer":
        """From a :class:`speechkd.config.TextConfig` (None gives the defaults)."""
        if cfg is None:
            return cls()
        return cls(cfg.lowercase, cfg.strip_punctuation, cfg.alphabet, cfg.spell_digits)

    def __call__(self, text: str) -> str:
        """The normalised transcript (see :func:`normalize_text`)."""
        return normalize_text(text, self.lowercase, self.strip_punctuation, self.spell_digits)

    def check(self, normalized: str) -> Optional[str]:
        """Why a normalised transcript is unusable as a training/evaluation target, or None when it is fine.

        Returns:
          ``"empty transcript"``, or ``"characters outside the alphabet [a-z0-9'] : 'é' (U+00E9)"``; None if good.
        """
        if not normalized:
            return "empty transcript (after normalisation)"
        if self._outside is not None:
            bad = sorted(set(self._outside.findall(normalized)))
            if bad:
                shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in bad[:5])
                return f"transcript has characters outside the alphabet [{self.alphabet}]: {shown}"
        return None
