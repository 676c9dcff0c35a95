"""Token pieces → display text and words, for byte-level BPE tokenizers (GPT-2 style, 'Ġ' marks a leading space).

Used by `analyze pmi` to merge word pieces into words and to render tokens. Pure text handling: no statistics, no I/O.
"""

from __future__ import annotations

import codecs
import unicodedata


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte → the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


BYTE_DECODER = _byte_decoder()


class PieceDecoder:
    """Token ids → display text per piece, cached per id; byte-level BPE exactly, other tokenizers approximately."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        probe = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a", add_special_tokens=False))
        self.byte_level = bool(probe) and probe[0].startswith("Ġ") and all(c in BYTE_DECODER for c in probe[0])
        self._bytes: dict[int, bytes] = {}

    def _piece_bytes(self, token_id: int) -> bytes:
        if token_id not in self._bytes:
            piece = self.tokenizer.convert_ids_to_tokens(int(token_id)) or ""
            if self.byte_level and all(c in BYTE_DECODER for c in piece):
                self._bytes[token_id] = bytes(BYTE_DECODER[c] for c in piece)
            else:  # sentencepiece-style: ▁ marks a leading space
                text = piece.replace("▁", " ") if "▁" in piece else self.tokenizer.convert_tokens_to_string([piece])
                self._bytes[token_id] = text.encode("utf-8")
        return self._bytes[token_id]

    def piece_text(self, token_id: int) -> str:
        """The text of one token id on its own (a partial character shows as U+FFFD)."""
        if token_id in self.special:
            return self.tokenizer.convert_ids_to_tokens(int(token_id)) or ""
        return self._piece_bytes(int(token_id)).decode("utf-8", errors="replace")

    def decode(self, token_ids) -> tuple[list[str], list[bool]]:
        """(text of each piece, is-special flag of each piece) for one response."""
        texts, specials = [], []
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token_id in token_ids:
            token_id = int(token_id)
            if token_id in self.special:
                if texts:
                    texts[-1] += utf8.decode(b"", final=True)
                utf8.reset()
                texts.append(self.tokenizer.convert_ids_to_tokens(token_id) or "")
                specials.append(True)
            else:
                texts.append(utf8.decode(self._piece_bytes(token_id)))
                specials.append(False)
        if texts:
            texts[-1] += utf8.decode(b"", final=True)
        return texts, specials


def _char_class(char: str) -> str:
    category = unicodedata.category(char)
    if char.isspace():
        return "space"
    if category[0] in "LM":
        return "letter"
    if category[0] == "N":
        return "digit"
    return "other"


def word_spans(texts: list[str], specials: list[bool]) -> list[tuple[int, int]]:
    """Group pieces into words: [(first piece, one past the last piece)], covering every piece in order.

    Rules (module docstring): whitespace-led piece, after whitespace, class change, or special token → new word; a
    lone " " prefixes the next word; consecutive whitespace pieces merge; an empty piece (a partial character) joins
    the current word.
    """
    spans: list[list[int]] = []
    word = ""
    for i, (text, special) in enumerate(zip(texts, specials)):
        starts = not spans or special or specials[i - 1]
        if not starts and text:
            if text.isspace():
                starts = not (word and word.isspace())
            elif text[0].isspace():
                starts = True
            elif word == " ":
                starts = False
            elif not word:
                starts = False
            else:
                starts = _char_class(text[0]) != _char_class(word[-1]) or word[-1].isspace()
        if starts:
            spans.append([i, i + 1])
            word = text
        else:
            spans[-1][1] = i + 1
            word += text
    return [(a, b) for a, b in spans]


def visible(text: str) -> str:
    """`text` with whitespace made visible: ␣ for a space, \\n, \\t, \\r."""
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def display_word(text: str) -> str:
    """The type of a word: its stripped text, or its visible whitespace for a whitespace-only word."""
    return text.strip() or visible(text)
