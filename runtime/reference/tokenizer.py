"""Offline, deterministic LLaMA-style tokenizer and IdeficsProcessor for tiny IDEFICS exports.

Vocab layout for ``build_tokenizer(vocab_size=V)``::

    0 <unk> (also pad)   1 <s> (bos)   2 </s> (eos)
    3 .. 258             byte-fallback pieces <0x00> .. <0xFF>
    259 .. 259+A-1       base alphabet: "▁" + printable ASCII + any other corpus chars (sorted)
    ..  V-4              BPE merges learned on ``TRAINING_TEXT`` (greedy, ties broken lexicographically);
                         if the corpus runs out of merges (V > ~1150) the rest is ``<reserved_i>`` filler
    V-3, V-2, V-1        <fake_token_around_image>, <image>, <end_of_utterance> (extra special tokens)
"""

from __future__ import annotations

import logging
import string
from collections import Counter

from transformers import IdeficsImageProcessorPil, IdeficsProcessor, LlamaTokenizer

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
EXTRA_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")
METASPACE = "\u2581"
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))

TRAINING_TEXT = """\
User: Describe this image.
Assistant: The image shows an astronaut in a white space suit standing in front of a rocket.
User: What is in the picture?
Assistant: A small gray cat is sleeping next to a cup of coffee on a wooden table.
User: Can you describe the image in detail?
Assistant: In this image, a woman is holding a helmet and smiling at the camera.
User: What color is the cat?
Assistant: The cat is orange with white paws, and it is looking out of the window.
User: Where was this photo taken?
Assistant: This photo was taken at a launch site, where the rocket is ready to fly.
User: Is there any text in the image?
Assistant: Yes, there is a sign with the name of the space center written on it.

The morning was cold and quiet when the astronaut walked out to the launch pad. She carried her helmet under one arm
and looked up at the tall white rocket that would take her into space. Behind her, the engineers checked their screens
one last time, and somebody poured another cup of hot coffee. Everyone in the room knew that this day would be
remembered for a long time.

A cat lives in the small house at the end of our street. Every afternoon it climbs onto the fence, stretches in the sun,
and watches the birds in the garden. When it rains, the cat sits by the kitchen window and waits for someone to open
the door. The children who live next door call it Captain, because it always looks like it is in charge of everything.

Good coffee starts with fresh beans. Grind them just before brewing, use water that is hot but not boiling, and let the
coffee rest for a few minutes before you drink it. Many people add milk or sugar, while others prefer it black and
strong. A warm cup of coffee in the morning can make a long day feel a little shorter.

Pictures tell stories that words sometimes cannot. A single image can show the light of a summer evening, the face of a
friend, or the shape of a mountain far away. When we describe an image, we try to notice the colors, the people, the
objects and the small details, and then we explain what is happening and why it might matter.

The model looks at each picture and answers questions about it. It can count the objects in the scene, read short
signs, name the animals and describe what the people are doing. If the question is unclear, the assistant should ask
for more information instead of guessing. Short and honest answers are better than long and wrong ones.

Scientists build rockets to carry satellites, telescopes and people beyond the atmosphere. Each launch needs careful
planning: the weather must be calm, the fuel must be ready, and every system on board has to be tested. After the
engines ignite, the rocket rises slowly at first and then faster and faster until it disappears into the blue sky.

Numbers and symbols also appear in everyday text: 1, 2, 3, 10, 42, 100, 2024, 3.14, 50% of the time, $5 for a coffee,
the answer is (a) or (b), send an e-mail to the team, and don't forget the question mark? Yes! It's done; we're ready.
"""


def _base_alphabet(text: str) -> list[str]:
    return sorted({METASPACE} | {c for c in string.printable if not c.isspace()} | set("".join(text.split())))


def min_vocab_size() -> int:
    """Smallest accepted ``vocab_size``: special + byte-fallback + base alphabet + IDEFICS extra tokens."""
    return len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + len(_base_alphabet(TRAINING_TEXT)) + len(EXTRA_TOKENS)


def _train_bpe(text: str, num_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Deterministic greedy BPE on whitespace-split words prefixed with "▁" (sentencepiece style).

    Returns (pieces, merges) where ``pieces`` holds exactly ``num_pieces`` distinct tokens
    (base alphabet first, then merged tokens in creation order, then reserved filler if needed).
    """
    # Metaspace(prepend_scheme="first", split=False) only prefixes "▁" at the start of the text and for
    # spaces, so words right after a newline or a special token are bare: learn both forms for line starts.
    word_counts = Counter(METASPACE + w for w in text.split())
    word_counts.update(line.split()[0] for line in text.splitlines() if line.strip())
    alphabet = _base_alphabet(text)
    if num_pieces < len(alphabet):
        raise ValueError(f"need at least {len(alphabet)} BPE pieces for the base alphabet, got {num_pieces}")
    pieces, seen = list(alphabet), set(alphabet)
    merges: list[tuple[str, str]] = []
    words = [[list(w), n] for w, n in sorted(word_counts.items())]
    while len(pieces) < num_pieces:
        pair_counts: Counter = Counter()
        for symbols, n in words:
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += n
        if not pair_counts:  # every word is a single token: pad with never-produced reserved pieces
            logger.warning("BPE exhausted after %d pieces; padding with %d reserved pieces",
                           len(pieces), num_pieces - len(pieces))
            pieces += [f"<reserved_{i}>" for i in range(num_pieces - len(pieces))]
            break
        # Highest count wins; ties broken by the lexicographically smallest pair -> machine independent.
        best = min(pair_counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in seen:
            seen.add(merged)
            pieces.append(merged)
        for entry in words:
            symbols, out, i = entry[0], [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            entry[0] = out
    return pieces, merges


def build_tokenizer(vocab_size: int = 1024) -> LlamaTokenizer:
    """Build a LLaMA-style fast BPE tokenizer (Metaspace + byte fallback) with ``len(tok) == vocab_size``.

    ``<unk>``=0 (pad), ``<s>``=1 (bos, prepended when ``add_special_tokens=True``), ``</s>``=2 (eos);
    the IDEFICS tokens ``<fake_token_around_image>``, ``<image>``, ``<end_of_utterance>`` are the last
    three ids and registered as extra (a.k.a. additional) special tokens. Padding side is left.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < min_vocab_size():
        raise ValueError(f"vocab_size={vocab_size} is too small; minimum is {min_vocab_size()}")
    num_pieces = vocab_size - len(SPECIAL_TOKENS) - len(BYTE_TOKENS) - len(EXTRA_TOKENS)
    pieces, merges = _train_bpe(TRAINING_TEXT, num_pieces)

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + BYTE_TOKENS + tuple(pieces) + EXTRA_TOKENS)}
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        add_bos_token=True,
        padding_side="left",
        extra_special_tokens=list(EXTRA_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    if len(tokenizer) != vocab_size:  # pragma: no cover - guards against transformers behaviour changes
        raise RuntimeError(f"built tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    ids = tokenizer.convert_tokens_to_ids(list(EXTRA_TOKENS))
    if ids != list(range(vocab_size - len(EXTRA_TOKENS), vocab_size)):  # pragma: no cover
        raise RuntimeError(f"extra special tokens got ids {ids}, expected the last {len(EXTRA_TOKENS)}")
    logger.info("built tokenizer: vocab_size=%d, %d BPE pieces, %d merges", vocab_size, len(pieces), len(merges))
    return tokenizer


def build_processor(tokenizer: LlamaTokenizer, image_size: int) -> IdeficsProcessor:
    """Wrap ``tokenizer`` and a PIL-backend IDEFICS image processor (IDEFICS mean/std) in an IdeficsProcessor.

    Note: in transformers 5.x ``special_tokens_map`` no longer lists extra special tokens, so
    IdeficsProcessor's ``<end_of_utterance>`` auto-detection is always False (also after a reload).
    Pass ``add_end_of_utterance_token=True`` to the processor call to get the IDEFICS v4 behaviour.
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    missing = [t for t in EXTRA_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"tokenizer lacks the IDEFICS special tokens {missing}")
    image_processor = IdeficsImageProcessorPil(image_size=image_size)  # IDEFICS_STANDARD_MEAN/STD by default
    return IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer, image_size=image_size)
