"""Checks on text that arrives from users, before anything tokenizes or encodes it."""
from __future__ import annotations


def check_unicode(name: str, text: str) -> None:
    """Text must be valid Unicode: a lone UTF-16 surrogate (JSON's ``"\\ud800"``) can be
    neither tokenized nor encoded as UTF-8, so it is a ValueError naming where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} holds a lone surrogate (U+{ord(text[exc.start]):04X}) at index {exc.start}; "
                         "text must be valid Unicode (surrogates only in pairs)") from None
