"""A deterministic tokenizer with a 1024-entry vocabulary.

Ids 0-7 are special tokens, 8-263 are the 256 bytes (so any text can be encoded and
decoded back exactly), and 264-1023 are word pieces: common English words, letters and
bigrams, then pronounceable pseudo-words that the simulator generates from.
Encoding splits text into word-sized chunks, maps a chunk that is a piece to one id and
falls back to the longest pieces inside it, then to bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

VOCAB_SIZE = 1024
UNK, BOS, EOS, IM_START, IM_END = 0, 1, 2, 3, 4
SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|reserved_5|>",
    "<|reserved_6|>",
    "<|reserved_7|>",
)
BYTE_BASE = len(SPECIALS)
PIECE_BASE = BYTE_BASE + 256

_COMMON = (
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are",
    "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by",
    "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said", "there",
    "use", "an", "each", "which", "she", "do", "how", "their", "if", "will", "up", "other",
    "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make",
    "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number",
    "no", "way", "could", "people", "my", "than", "first", "water", "been", "call", "who",
    "its", "now", "find", "long", "down", "day", "did", "get", "come", "made", "may", "part",
    "over", "new", "sound", "take", "only", "little", "work", "know", "place", "year", "live",
    "me", "back", "give", "most", "very", "after", "thing", "our", "just", "name", "good",
    "sentence", "man", "think", "say", "great", "where", "help", "through", "much", "before",
    "line", "right", "too", "mean", "old", "any", "same", "tell", "boy", "follow", "came",
    "want", "show", "also", "around", "form", "three", "small", "set", "put", "end", "does",
    "another", "well", "large", "must", "big", "even", "such", "because", "turn", "here", "why",
    "ask", "went", "men", "read", "need", "land", "different", "home", "us", "move", "try",
    "kind", "hand", "picture", "again", "change", "off", "play", "spell", "air", "away",
    "animal", "house", "point", "page", "letter", "mother", "answer", "found", "study", "still",
    "learn", "should", "world", "high", "hello", "please", "model", "request", "token", "fast",
    "slow", "ready", "warm"
)  # fmt: skip
_CAPITALISED = ("The", "I", "A", "In", "It", "This", "What", "How", "You", "We", "Hello")
_BIGRAMS = (
    "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of",
    "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le",
    "ve", "co", "me", "de", "hi", "ri", "ro", "ic", "ne", "ea", "ra", "ce", "li", "ch", "ll",
    "be", "ma", "si", "om", "ur", "ing", "ion", "ly", "ment", "tion", "ation", "ness", "ers",
    "est"
)  # fmt: skip
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIALS))
# Word-sized chunks: an optional space and letters, digits, a whitespace run, or any char.
_CHUNK_RE = re.compile(r" ?[A-Za-z]+| ?[0-9]+|\s+|.", re.DOTALL)


def _pieces() -> list[str]:
    pieces: list[str] = []
    seen: set[str] = set()

    def add(piece: str) -> None:
        if piece not in seen and len(pieces) < VOCAB_SIZE - PIECE_BASE:
            seen.add(piece)
            pieces.append(piece)

    for word in _COMMON:
        add(" " + word)
    for word in _CAPITALISED:
        add(" " + word)
        add(word)
    for letter in "abcdefghijklmnopqrstuvwxyz":
        add(" " + letter)
    for bigram in _BIGRAMS:
        add(bigram)
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    # A stride through all two-syllable words spreads the pseudo-words over the alphabet.
    combos = [a + b for a in syllables for b in syllables]
    index = 0
    while len(pieces) < VOCAB_SIZE - PIECE_BASE:
        add(" " + combos[index % len(combos)])
        index += 37
    return pieces


@dataclass(frozen=True, slots=True)
class _Vocab:
    id_to_piece: tuple[str, ...]
    piece_to_id: dict[str, int]
    longest_piece: int
    generation_ids: tuple[int, ...]


def _build_vocab() -> _Vocab:
    pieces = _pieces()
    id_to_piece = list(SPECIALS) + [_byte_str(b) for b in range(256)] + pieces
    piece_to_id = {p: PIECE_BASE + i for i, p in enumerate(pieces)}
    for b in range(128):  # a single ASCII character is its byte token
        piece_to_id.setdefault(chr(b), BYTE_BASE + b)
    generation_ids = tuple(
        PIECE_BASE + i
        for i, p in enumerate(pieces)
        if p.startswith(" ") and p[1:].isalpha() and p[1:].islower() and len(p) > 2
    )
    return _Vocab(tuple(id_to_piece), piece_to_id, max(map(len, pieces)), generation_ids)


def _byte_str(b: int) -> str:
    return chr(b) if 32 <= b < 127 else f"<0x{b:02X}>"


class Tokenizer:
    """Text <-> ids. `decode(encode(text)) == text` for every text."""

    vocab_size = VOCAB_SIZE
    eos_id = EOS

    def __init__(self) -> None:
        self._vocab = _build_vocab()

    @property
    def generation_ids(self) -> tuple[int, ...]:
        """Word pieces the simulator generates from (each starts with a space)."""
        return self._vocab.generation_ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for special in _SPECIAL_RE.finditer(text):
            self._encode_plain(text[start : special.start()], ids)
            ids.append(SPECIALS.index(special.group()))
            start = special.end()
        self._encode_plain(text[start:], ids)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        pending = bytearray()  # byte tokens are joined first: one char may span several
        for token_id in ids:
            if BYTE_BASE <= token_id < PIECE_BASE:
                pending.append(token_id - BYTE_BASE)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if token_id >= BYTE_BASE or not skip_special_tokens:
                out.append(self._vocab.id_to_piece[token_id])
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_str(self, token_id: int) -> str:
        """How one token is shown in logprobs and `token_strs`."""
        return self._vocab.id_to_piece[token_id]

    def is_valid(self, ids: Sequence[int]) -> bool:
        return all(0 <= i < VOCAB_SIZE for i in ids)

    def _encode_plain(self, text: str, ids: list[int]) -> None:
        piece_to_id = self._vocab.piece_to_id
        for chunk in _CHUNK_RE.findall(text):
            token_id = piece_to_id.get(chunk)
            if token_id is not None:
                ids.append(token_id)
            else:
                self._encode_chunk(chunk, ids)

    def _encode_chunk(self, chunk: str, ids: list[int]) -> None:
        piece_to_id = self._vocab.piece_to_id
        i = 0
        while i < len(chunk):
            for length in range(min(self._vocab.longest_piece, len(chunk) - i), 0, -1):
                token_id = piece_to_id.get(chunk[i : i + length])
                if token_id is not None:
                    ids.append(token_id)
                    i += length
                    break
            else:
                ids.extend(BYTE_BASE + b for b in chunk[i].encode("utf-8"))
                i += 1


def render_chat(messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """The simulator's chat template (ChatML after BOS), as a model's Jinja template would."""
    parts = ["<s>"] + [f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
