"""A stand-in tokenizer for the tiny test checkpoint.

The real Ming tokenizer.json (a 126k-entry byte-level BPE) ships only with the weights. Tests and the offline demo run
on a tiny random checkpoint, which still needs a tokenizer that:
  * puts every special token at its official id (126080..126367, from the released tokenizer_config.json),
  * has the official vocabulary size (126464), so any id the random model emits is a real token,
  * decodes every ordinary id to something readable (bytes, learned merges, CJK characters, pseudo word pieces),
  * loads both in `tokenizers` (our processor) and in the reference's BailingTokenizer (transformers 4.45),
    and tokenizes identically in both,
  * is rebuilt deterministically and quickly (no training randomness, no network).

Layout of the ordinary ids 0..126079 (then 126368..126463 after the special block):
  0..255      one token per byte (GPT-2 byte-to-printable-character alphabet)
  next        CJK Unified Ideographs U+4E00..U+9FA5 and CJK punctuation, each one token (plus the 2-byte prefixes
              that the merges build them from)
  next        merges learned from a small built-in English + Chinese text
  the rest    pronounceable pseudo word pieces ("Ġbalo", "trend", "Shi", ...)
  126463      "</thinking>" (THINKING_END), which no merge reaches
"""

import json
import os
import shutil
from collections import Counter
from functools import lru_cache

from tokenizers import Tokenizer

from ..configs import RELEASE_DATA_DIR

VOCAB_SIZE = 126464
FIRST_SPECIAL_ID = 126080

DATA_DIR = os.path.join(RELEASE_DATA_DIR, "tokenizer")

# Split text into words / numbers / punctuation runs before byte-level BPE (the GPT-4 style pattern).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_LEARNED_MERGES = 2000

# The thinking prompt asks for the reasoning inside <thinking>...</thinking>. In this vocabulary "</thinking>" is also
# one ordinary token, the last ordinary id (126463), reachable by no merge (the pre-tokenizer splits "</", "thinking"
# and ">" apart), so it never changes how text is encoded: only the tiny thinker emits it (see ming/testing/tiny.py).
THINKING_END = "</thinking>"
THINKING_END_ID = VOCAB_SIZE - 1

# Text the merges are learned from. Original text written for this file.
_CORPUS = """\
The model listens to speech, looks at pictures and videos, and answers in text or in a spoken voice.
When the user asks a question, the assistant thinks about the question and then gives a short and helpful answer.
This picture shows a small red house next to a river. There are two trees in front of the house and a dog is
sleeping on the grass. The sky is blue and there are a few white clouds. In the video, a person walks along the
street, stops at a shop, and then turns left. Please describe what you see in the image. What is the man doing?
Please recognize the language of this speech and transcribe it. The weather today is sunny with a light wind,
and the temperature will reach twenty five degrees in the afternoon. I would like to book a table for four people
at seven o'clock this evening. Can you tell me how to get to the station? It's about ten minutes from here.
We're going to learn how a language model works: it reads tokens, predicts the next token, and repeats.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. Numbers: 1, 2, 3, 10, 42, 100, 2025.
Thank you very much! You're welcome. Good morning, good afternoon, good evening and good night.
这张图片里有一座红色的小房子，旁边是一条小河。房子前面有两棵树，一只狗正在草地上睡觉。
今天天气很好，阳光明媚，微风轻拂，下午的气温会达到二十五度。请识别这段语音的语言并转写出来。
我们想预订今晚七点的四人桌。请问去火车站怎么走？从这里走大约十分钟。
这个模型可以听懂语音，看懂图片和视频，并用文字或者声音回答问题。
用户提出问题的时候，助手会先思考，然后给出简短而有帮助的回答。谢谢你！不客气。早上好，晚上好。
视频中，一个人沿着街道走，在一家商店门口停下来，然后向左转。请描述一下你在图片中看到了什么。
"""

# Pieces for pseudo words that fill the rest of the vocabulary.
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z",
           "br", "ch", "cl", "cr", "dr", "fl", "fr", "gr", "pl", "pr", "sh", "sl", "sp", "st", "str", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "oo"]
_CODAS = ["", "n", "r", "s", "t", "l", "m", "ng", "nd", "st", "ck", "rd", "x"]
_CJK_PUNCTUATION = "，。！？：；、“”‘’（）《》【】…—·"


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE (printable Latin-1 bytes map to themselves)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@lru_cache(maxsize=1)
def byte_alphabet_inverse() -> dict[str, int]:
    return {char: b for b, char in byte_alphabet().items()}


def to_byte_level(text: str) -> str:
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in text.encode("utf-8"))


def load_special_tokens() -> dict[int, dict]:
    """Official special tokens {id: AddedToken fields} from the released tokenizer_config.json."""
    with open(os.path.join(DATA_DIR, "tokenizer_config.json"), encoding="utf-8") as f:
        decoder = json.load(f)["added_tokens_decoder"]
    return {int(token_id): fields for token_id, fields in decoder.items()}


class _VocabBuilder:
    """Hands out ids in order and records the merges that make each multi-symbol token reachable."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.merges: list[tuple[str, str]] = []

    def add_token(self, token: str) -> None:
        if token not in self.vocab:
            self.vocab[token] = len(self.vocab)

    def add_merge(self, left: str, right: str) -> None:
        if left + right not in self.vocab:
            self.merges.append((left, right))
            self.add_token(left + right)


def _cjk_characters() -> list[str]:
    return [chr(cp) for cp in range(0x4E00, 0x9FA6)] + list(_CJK_PUNCTUATION)


def _learn_merges(builder: _VocabBuilder, atomic_chars: set[str], num_merges: int) -> None:
    """Plain BPE training on the built-in corpus; ties broken by the pair's text, so the result is deterministic."""
    pre_tokenizer = Tokenizer.from_str(json.dumps(_tokenizer_json({}, [], []))).pre_tokenizer
    word_counts = Counter(piece for piece, _ in pre_tokenizer.pre_tokenize_str(_CORPUS))
    words = {}
    for word in word_counts:
        # Start from characters we already have as one token (CJK), else from single bytes.
        symbols = []
        for char in bytes(byte_alphabet_inverse()[c] for c in word).decode("utf-8"):
            level = to_byte_level(char)
            symbols.extend([level] if char in atomic_chars else list(level))
        words[word] = symbols

    for _ in range(num_merges):
        pair_counts: Counter = Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += word_counts[word]
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        if pair_counts[best] < 2:
            break
        builder.add_merge(*best)
        merged = best[0] + best[1]
        for word, symbols in words.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[word] = out


def _pseudo_words():
    """Endless deterministic stream of word-like pieces: syllables first, then two-syllable words."""
    syllables = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    for syllable in syllables:
        yield " " + syllable
        yield syllable
        yield " " + syllable.capitalize()
    n = len(syllables)
    stride = 1_000_003  # prime, coprime with n*n, so k*stride mod n*n visits every pair once
    for k in range(n * n):
        first, second = divmod(k * stride % (n * n), n)
        word = syllables[first] + syllables[second]
        yield (" " + word) if k % 2 == 0 else word


def build_tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The ordinary (non-special) vocabulary and merges; special ids are left for the caller to fill."""
    builder = _VocabBuilder()
    for b in range(256):
        builder.add_token(byte_alphabet()[b])

    cjk = _cjk_characters()
    for char in cjk:
        level = to_byte_level(char)
        for end in range(2, len(level) + 1):
            builder.add_merge(level[: end - 1], level[end - 1])

    _learn_merges(builder, set(cjk), NUM_LEARNED_MERGES)

    num_ordinary = VOCAB_SIZE - len(load_special_tokens())
    words = _pseudo_words()
    while len(builder.vocab) < num_ordinary - 1:
        builder.add_token(to_byte_level(next(words)))
    builder.add_token(THINKING_END)  # last: the id the tiny thinker is made to emit to end its reasoning
    return builder.vocab, builder.merges


def _tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]], added_tokens: list[dict]) -> dict:
    # Written by hand (not Tokenizer.save) so merges use the "a b" string form that every tokenizers version reads.
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": None,
        "decoder": byte_level,
        "model": bpe_model_json(vocab, merges),
    }


def bpe_model_json(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict:
    """The `model` section of a tokenizer.json for a byte-level BPE. Merges are written in the "a b" string form,
    which every `tokenizers` version reads (the reference venv has 0.20)."""
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "vocab": vocab,
        "merges": [f"{left} {right}" for left, right in merges],
    }


def write_tiny_tokenizer(out_dir: str) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for the tiny checkpoint."""
    ordinary, merges = build_tiny_vocab()
    special = load_special_tokens()
    ordinary_ids = [i for i in range(VOCAB_SIZE) if i not in special]
    tokens_in_order = sorted(ordinary, key=ordinary.get)

    # Special tokens live in the BPE vocab too, at their official ids, so every tokenizers version assigns the same id.
    vocab = {token: token_id for token, token_id in zip(tokens_in_order, ordinary_ids)}
    added_tokens = []
    for token_id, fields in sorted(special.items()):
        vocab[fields["content"]] = token_id
        added_tokens.append({"id": token_id, **{k: fields[k] for k in
                             ("content", "single_word", "lstrip", "rstrip", "normalized", "special")}})
    assert len(vocab) == VOCAB_SIZE and sorted(vocab.values()) == list(range(VOCAB_SIZE))

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(_tokenizer_json(vocab, merges, added_tokens), f, ensure_ascii=False, separators=(",", ":"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(os.path.join(DATA_DIR, name), os.path.join(out_dir, name))
