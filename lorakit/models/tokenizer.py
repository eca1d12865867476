"""CLIP tokenizer files built offline from the BPE vocabulary shipped in ``models/data``.

Stable Diffusion's text encoders use OpenAI's CLIP tokenizer (SD1.5, SDXL's first encoder) and the same
vocabulary with ``!`` as padding (SDXL's OpenCLIP bigG encoder). Hugging Face reads them from ``vocab.json``
and ``merges.txt``; we derive both from the original BPE merges list so nothing is fetched from a hub.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path

BPE_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character table every GPT-2-style BPE uses.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


@cache
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (49,408 tokens) and merge rules, as CLIP's own tokenizer builds them."""
    lines = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write a Hugging Face ``CLIPTokenizer`` folder; ``pad_token="!"`` gives SDXL's second tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
        "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": True, **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder
