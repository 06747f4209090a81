"""Kimi-VL tokenizer: tiktoken BPE over the checkpoint's `tiktoken.model`.

Layout (Moonshot `TikTokenTokenizer`): ids 0..B-1 are the BPE ranks of `tiktoken.model`
(B = number of lines), ids B..B+257 are special tokens. Their names come from
`tokenizer_config.json` `added_tokens_decoder`; ids it does not name are `<|reserved_token_{id}|>`.
Nothing about ids is hard-coded: look special tokens up by name.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from kimivl_cli.errors import CheckpointError
from kimivl_cli.guards import inside, read_checkpoint_file, read_config, short_repr

# The official split pattern uses `[...&&[^\p{Han}]]` set intersection; written here as a
# negative lookahead per character, which tiktoken's fancy-regex and Python's `regex` both read
# the same way (tests compare it with the original under `regex`'s V1 set semantics).
_UPPER = r"(?:(?!\p{Han})[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}])"
_LOWER = r"(?:(?!\p{Han})[\p{Ll}\p{Lm}\p{Lo}\p{M}])"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
PAT_STR = "|".join(
    [
        r"[\p{Han}]+",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

NUM_RESERVED_SPECIAL_TOKENS = 256
NUM_SPECIAL_TOKENS = NUM_RESERVED_SPECIAL_TOKENS + 2  # the reference's range(B, B + 256 + 2)

MAX_TIKTOKEN_BYTES = 256 << 20  # the real tiktoken.model is ~2.5 MB
MAX_ENCODE_CHARS = 400_000  # tiktoken panics on longer inputs (openai/tiktoken#195)
MAX_RUN_CHARS = 25_000  # longest run of (non-)whitespace handed to tiktoken at once
_RUNS = re.compile(r"\s+|\S+")  # `re`'s \s is exactly str.isspace, as in the reference splitter


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `base64(token) rank` per line."""
    path = Path(path)
    try:
        lines = read_checkpoint_file(path, MAX_TIKTOKEN_BYTES).splitlines()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no tiktoken.model", "the checkpoint folder lacks its tokenizer") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise CheckpointError(f"{path}:{number}: not a tiktoken line (base64 token, space, rank)") from None
    if not ranks:
        raise CheckpointError(f"{path}: tiktoken.model is empty", "the download is incomplete")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks are not unique and dense 0..{len(ranks) - 1}")
    return ranks


def split_for_tiktoken(text: str) -> Iterator[str]:
    """Cut text into <=400k-char chunks, then cut (non-)whitespace runs longer than 25k chars.

    Same cut points as the reference: a run is cut every 25,000 characters from its start;
    shorter runs are never split, so ordinary text goes to tiktoken whole.
    """
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        piece_start = 0
        for run in _RUNS.finditer(chunk):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[piece_start:cut]
                piece_start = cut
        yield chunk[piece_start:]


@dataclass(frozen=True)
class SpecialTokens:
    """Names of the bos/eos/unk/pad tokens (`tokenizer_config.json` fields, the reference defaults)."""

    bos: str = "[BOS]"
    eos: str = "[EOS]"
    unk: str = "[UNK]"
    pad: str = "[PAD]"


class Tokenizer:
    """Encode/decode text with special tokens; O(len(text)) via tiktoken's Rust BPE."""

    def __init__(self, ranks: dict[bytes, int], added_tokens: dict[int, str], names: SpecialTokens | None = None):
        """`added_tokens`: id -> name from `added_tokens_decoder`; as in the reference, only ids in the
        special range B..B+257 count (others, inside the BPE ranks or beyond, are ignored)."""
        self.num_base_tokens = base = len(ranks)
        ids = range(base, base + NUM_SPECIAL_TOKENS)
        special = {added_tokens.get(i, f"<|reserved_token_{i}|>"): i for i in ids}
        if len(special) != len(ids):
            raise CheckpointError("tokenizer_config.json: two special tokens share one name")
        self.special_tokens = special
        self.names = names or SpecialTokens()
        self._special_ids = frozenset(special.values())
        self._encoding = tiktoken.Encoding("kimi-vl", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=special)

    @classmethod
    def from_dir(cls, folder: str | Path) -> Tokenizer:
        """Load `tiktoken.model` + `tokenizer_config.json` from a checkpoint folder."""
        folder = Path(folder)
        ranks = load_tiktoken_ranks(inside(folder, "tiktoken.model"))
        config_path = inside(folder, "tokenizer_config.json")
        config = read_config(
            config_path, "tokenizer_config.json", missing_hint="the checkpoint folder lacks its tokenizer"
        )
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise CheckpointError(
                f"{config_path}: added_tokens_decoder must be an object of id -> token, got a {type(decoder).__name__}"
            )
        added: dict[int, str] = {}
        for key, entry in decoder.items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if not (key.isdigit() and isinstance(content, str) and content):
                raise CheckpointError(f"{config_path}: bad added_tokens_decoder entry {short_repr(key)}")
            added[int(key)] = content

        def name(field: str, default: str) -> str:
            value = config.get(field) or default
            value = value.get("content", default) if isinstance(value, dict) else value
            if not isinstance(value, str):
                raise CheckpointError(f"{config_path}: {field} must be a token name, got {short_repr(value)}")
            return value

        names = SpecialTokens(
            bos=name("bos_token", "[BOS]"),
            eos=name("eos_token", "[EOS]"),
            unk=name("unk_token", "[UNK]"),
            pad=name("pad_token", "[PAD]"),
        )
        return cls(ranks, added, names)

    # --- ids by name -------------------------------------------------------------------------
    def token_id(self, name: str) -> int:
        """Id of a special token, e.g. `token_id("<|im_end|>")`."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise CheckpointError(f"tokenizer has no special token {name}", "check tokenizer_config.json") from None

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    @property
    def eos_id(self) -> int:
        return self.token_id(self.names.eos)

    @property
    def im_end_id(self) -> int:
        return self.token_id("<|im_end|>")

    @property
    def media_pad_id(self) -> int:
        return self.token_id("<|media_pad|>")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # --- encode / decode -----------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids, no BOS. Special-token strings in `text` stay plain text unless `allow_special`
        (for the chat template's own markup only: never for user or document text)."""
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for piece in split_for_tiktoken(text):
            ids.extend(self._encoding.encode(piece, allowed_special=allowed, disallowed_special=()))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self._encoding.decode_single_token_bytes(token_id)
        except KeyError:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})") from None

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids if not (skip_special and i in self._special_ids))

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of the ids; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def incremental_decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special)


class IncrementalDecoder:
    """Streaming detokeniser: `push(id)` returns the newly complete text.

    Bytes of a multi-byte character split across tokens are held back until the character is
    complete; the concatenation of all pushes plus `flush()` equals `decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Text still held back (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
