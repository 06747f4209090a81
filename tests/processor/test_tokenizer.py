"""Tokenizer over a generated checkpoint's real BPE file: split pattern, specials, streaming decode."""

from __future__ import annotations

import json

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from kimivl_cli.errors import CheckpointError
from kimivl_cli.processor.tokenizer import (
    MAX_RUN_CHARS,
    NUM_SPECIAL_TOKENS,
    PAT_STR,
    Tokenizer,
    load_tiktoken_ranks,
    split_for_tiktoken,
)

# The official pattern, verbatim, with `&&` set intersection (regex's V1 mode reads it as such).
OFFICIAL_PAT = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
MIXED = [
    "我爱北京天安门，The QUICK brown fox's 日本語のテキスト かな カナ 한국어 ありがとう123\n\n  x  \r\n",
    "Hello世界&&abc it's 中文English ÄÖ Ünïcode 1234567 ㄅㄆ 〇〡 𠀀𪚥 ＡＢＣ ａｂ ١٢٣ café ŒUVRE",
    "模型Kimi-VL支持中文和English混合，比如「图片」和 'quotes' DON'T don't I'LL\t\ttabs   end",
]


def _tiktoken_pieces(text: str) -> list[str]:
    """How tiktoken (Rust fancy-regex) splits `text` under PAT_STR.

    Every piece the official pattern produces is made a single token (all its prefixes are
    ranks); tiktoken returns one token per piece exactly when its split agrees.
    """
    ranks = {bytes([i]): i for i in range(256)}
    for piece in regex.findall("(?V1)" + OFFICIAL_PAT, text):
        data = piece.encode()
        for k in range(2, len(data) + 1):
            ranks.setdefault(data[:k], len(ranks))
    enc = tiktoken.Encoding("probe", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    return [enc.decode_single_token_bytes(t).decode() for t in enc.encode(text)]


@pytest.mark.parametrize("text", MIXED)
def test_split_pattern_matches_official_semantics(text):
    official = regex.findall("(?V1)" + OFFICIAL_PAT, text)
    assert regex.findall(PAT_STR, text) == official
    assert _tiktoken_pieces(text) == official


def test_han_is_split_from_other_letters():
    pieces = regex.findall(PAT_STR, MIXED[0])
    assert pieces[:2] == ["我爱北京天安门", "，The"] and "のテキスト" in pieces and " 한국어" in pieces


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab AZ中文字の한'\n\t1é\u0301😀,")), max_size=40))
def test_split_pattern_property(text):
    assert regex.findall(PAT_STR, text) == regex.findall("(?V1)" + OFFICIAL_PAT, text)


def test_special_tokens_from_tokenizer_config(tokenizer, tiny_ckpt):
    added = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert len(added) >= 16
    for key, entry in added.items():
        assert tokenizer.encode(entry["content"], allow_special=True) == [int(key)]
        assert tokenizer.decode([int(key)]) == entry["content"]
        assert tokenizer.is_special(int(key))
    assert tokenizer.encode("<|im_end|>") == tokenizer.encode("<|im_end|>", allow_special=False)  # plain by default
    assert tokenizer.im_end_id not in tokenizer.encode("<|im_end|>")
    base = tokenizer.num_base_tokens
    assert tokenizer.vocab_size == base + NUM_SPECIAL_TOKENS
    assert tokenizer.token_id(f"<|reserved_token_{base + 5}|>") == base + 5  # unnamed ids are reserved
    # the generated tiny checkpoint mirrors the goldens' tiny ids (real id - 162605)
    assert (tokenizer.token_id(tokenizer.names.bos), tokenizer.eos_id, tokenizer.im_end_id, tokenizer.media_pad_id) == (
        979,
        980,
        981,
        1000,
    )
    assert tokenizer.token_id("<|im_system|>") == 989 and tokenizer.token_id("<|im_middle|>") == 996
    with pytest.raises(CheckpointError, match="no special token"):
        tokenizer.token_id("<|nope|>")


def test_encode_with_specials_in_text(tokenizer):
    ids = tokenizer.encode("<|im_user|>user<|im_middle|>你好 world<|im_end|>", allow_special=True)
    assert ids[0] == tokenizer.token_id("<|im_user|>") and ids[-1] == tokenizer.im_end_id
    assert tokenizer.decode(ids) == "<|im_user|>user<|im_middle|>你好 world<|im_end|>"
    assert tokenizer.decode(ids, skip_special=True) == "user你好 world"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_unicode(tokenizer, text):
    ids = tokenizer.encode(text, allow_special=False)
    assert all(0 <= i < tokenizer.num_base_tokens for i in ids)
    assert tokenizer.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_streaming_decoder_holds_partial_utf8(tokenizer, text):
    ids = tokenizer.encode(text, allow_special=False)
    decoder = tokenizer.incremental_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_streaming_decoder_byte_by_byte(tokenizer):
    text = "中文😀é"
    decoder = tokenizer.incremental_decoder()
    out = [decoder.push(b) for b in text.encode()]  # ids 0..255 are the single bytes
    assert out == ["", "", "中", "", "", "文", "", "", "", "😀", "", "é"]
    cut = tokenizer.incremental_decoder()
    assert cut.push("😀".encode()[0]) == "" and cut.flush() == "\ufffd"


def test_long_runs_are_cut_like_the_reference():
    def reference(s: str, limit: int):  # the reference algorithm, character by character
        start, run, space = 0, 0, s[0].isspace() if s else False
        for i, c in enumerate(s):
            if c.isspace() != space:
                run, space = 1, c.isspace()
            else:
                run += 1
                if run > limit:
                    yield s[start:i]
                    start, run = i, 1
        yield s[start:]

    text = "a" * (2 * MAX_RUN_CHARS + 7) + " " * (MAX_RUN_CHARS + 1) + "b c" + "\u3000" * MAX_RUN_CHARS + "d"
    assert list(split_for_tiktoken(text)) == list(reference(text, MAX_RUN_CHARS))
    assert list(split_for_tiktoken("short text")) == ["short text"]


def test_long_text_encodes(tokenizer):
    text = ("x" * 60_000 + " 中文 ") * 8  # > 400k chars, runs > 25k
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_broken_tokenizer_files(tmp_path, tiny_ckpt):
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_ckpt / name).read_bytes())
    with open(tmp_path / "tiktoken.model", "a") as f:
        f.write("not-base64!! x\n")
    with pytest.raises(CheckpointError, match=r"tiktoken\.model:980"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_bytes((tiny_ckpt / "tiktoken.model").read_bytes())
    assert len(load_tiktoken_ranks(tmp_path / "tiktoken.model")) == 979
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match=r"no tiktoken\.model"):
        Tokenizer.from_dir(tmp_path / "missing")
