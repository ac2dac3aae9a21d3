"""S3-BPE: the talker's compressed spelling of CosyVoice-1 speech tokens.

The audio detokenizer consumes S3 speech tokens at 50 Hz (a 4096-entry codebook). The talker does not predict them
one by one: each S3 token is first written as one character (`talker/s3_bpe/char_mapping.txt`, lines
`<s3 id>\\t<character>`), and a BPE model (`talker/s3_bpe/tokenizer.json`, HF `tokenizers`) merges frequent runs of
those characters, so the talker emits about a third fewer tokens. Decoding is lossless: BPE ids -> characters ->
S3 ids.
"""

from __future__ import annotations

import os

from tokenizers import Tokenizer


def read_char_mapping(path: str | os.PathLike) -> dict[int, str]:
    """`char_mapping.txt` as {s3 id: character}."""
    mapping: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != 2 or len(fields[1]) != 1:
                raise ValueError(f"{path}:{line_number}: expected '<s3 id>\\t<one character>', got {line!r}")
            mapping[int(fields[0])] = fields[1]
    return mapping


class S3BpeCodec:
    """Converts between S3 speech tokens and the talker's BPE ids (ids counted from 0, without the talker's
    text-vocabulary offset)."""

    def __init__(self, bpe: Tokenizer, char_of_s3: dict[int, str]):
        self.bpe = bpe
        self.char_of_s3 = char_of_s3
        self.s3_of_char = {char: s3_id for s3_id, char in char_of_s3.items()}
        if len(self.s3_of_char) != len(char_of_s3):
            raise ValueError("char_mapping.txt maps two S3 tokens to the same character")

    @classmethod
    def from_dir(cls, s3_bpe_dir: str | os.PathLike) -> "S3BpeCodec":
        """Read `tokenizer.json` and `char_mapping.txt` from a `talker/s3_bpe` folder."""
        bpe = Tokenizer.from_file(os.path.join(s3_bpe_dir, "tokenizer.json"))
        return cls(bpe, read_char_mapping(os.path.join(s3_bpe_dir, "char_mapping.txt")))

    @property
    def vocab_size(self) -> int:
        return self.bpe.get_vocab_size(with_added_tokens=True)

    @property
    def codebook_size(self) -> int:
        """Number of distinct S3 tokens (the detokenizer's input vocabulary)."""
        return len(self.char_of_s3)

    def encode(self, s3_tokens: list[int]) -> list[int]:
        text = "".join(self.char_of_s3[t] for t in s3_tokens)
        return self.bpe.encode(text).ids

    def decode(self, bpe_ids: list[int]) -> list[int]:
        # Without a decoder, `tokenizers` joins the pieces with spaces; the characters themselves never are spaces.
        text = self.bpe.decode(bpe_ids, skip_special_tokens=True).replace(" ", "")
        unknown = sorted({char for char in text if char not in self.s3_of_char})
        if unknown:
            raise ValueError(f"S3-BPE decode produced characters missing from char_mapping.txt: {unknown[:10]}")
        return [self.s3_of_char[char] for char in text]
