"""A tiny CLIP BPE vocabulary for the world's words, written as vocab.json + merges.txt.

The layout copies OpenAI CLIP's (256 byte symbols, the same with an end-of-word marker, learned merges,
then the two special tokens) so the stock `CLIPTokenizer` reads it: any text still tokenizes (byte
fallback), and each world word becomes exactly one token, which keeps the text encoder's job easy.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from deradiff.world.spec import world_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"
MODEL_MAX_LENGTH = 16


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (needed so merges are plain text)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Classic BPE training: merge the most frequent adjacent pair until every word is one symbol.

    Ties break on the pair itself, so the result is deterministic.
    """
    byte_map = bytes_to_unicode()
    seqs = []
    for word in words:
        chars = [byte_map[b] for b in word.encode("utf-8")]
        seqs.append(chars[:-1] + [chars[-1] + EOW])
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        counts = Counter(pair for s in seqs for pair in zip(s, s[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        seqs = [_apply_merge(s, best) for s in seqs]
    return merges


def _apply_merge(seq: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every occurrence of `pair` in `seq` by the joined symbol."""
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP-ordered vocab: byte symbols, byte symbols + </w>, merge results, BOS, EOS."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + EOW for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer_files(directory: str | Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt for the world's words into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(world_words())
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(build_vocab(merges), ensure_ascii=False, indent=0), encoding="utf-8")
    lines = ["#version: 0.2 - deradiff tiny world"] + [f"{a} {b}" for a, b in merges]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """Write the vocab files and load them with the stock CLIPTokenizer (pad with EOS, as SD does)."""
    vocab_path, merges_path = write_tokenizer_files(directory)
    return CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=MODEL_MAX_LENGTH,
                         bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
