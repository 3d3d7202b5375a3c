"""A tiny, self-contained demo tokenizer: corpus text in, byte-level BPE tokenizer out.

`DEMO_CORPUS` is a few KB of original English prose (plus numbers, punctuation and
some non-ASCII). `train_demo_tokenizer` trains an OPT-like GPT-2 byte-level BPE on it
with the `tokenizers` library, deterministically, so tests and demos get a real
tokenizer without touching the network. `save_demo_tokenizer` writes it to a folder
in the HF layout (`tokenizer.json`, `tokenizer_config.json`) that `jaxserve.tokenizer`
and `transformers.AutoTokenizer` both load.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0, 1, 2, 3, as in OPT

DEMO_CORPUS = """\
Serving a language model is mostly a question of waiting well. A request arrives with a
prompt, the server turns the text into tokens, and the model reads every prompt token at
once. That first pass is called prefill; it is heavy on arithmetic and light on memory.
Then the model writes one token at a time, and each step reads the whole key-value cache
again. That second phase, decoding, is light on arithmetic and heavy on memory traffic.

Because the two phases want different things, some engines split them: a prefill instance
handles prompts, a decode instance handles the long tail of generation, and the cache moves
between them. The user sees two numbers. Time to first token (TTFT) says how long the
prompt took; time per output token (TPOT) says how fast the rest of the answer streams.
A good plan keeps both under their targets for at least 90% of requests.

The weather this morning was grey and cool, about 12 degrees, with a light wind from the
west. By noon the clouds broke up and the sun came out; by four o'clock it was raining
again. The forecast for tomorrow says 18 degrees and clear skies, but forecasts are only
guesses with decimals attached. Pack an umbrella anyway.

To make a simple tomato soup, soften one chopped onion in two tablespoons of olive oil,
add three cloves of garlic, then 800 grams of tomatoes and half a litre of stock. Simmer
for 25 minutes, blend until smooth, and season with salt, pepper and a pinch of sugar.
Serve it hot with bread. If it is too thick, add water; if it is too thin, keep simmering.

Numbers appear everywhere: 0, 1, 2, 3, 7, 42, 100, 256, 1024, 65536 and 3.14159. A batch
of 8 sequences with 2048 tokens each holds 16384 tokens; at 2 bytes per value, a cache of
that size for a 13B model takes several gigabytes. Prices go up by 5% or down by 0.5%;
the meeting is at 09:30 on 2024-03-15, room #12, and the code is A-17/B.

Punctuation matters too! Does it? Yes: commas, semicolons; colons: dashes - and quotes
"like these" or 'like those'. Brackets (round), [square] and {curly}; slashes / and
backslashes \\; at-signs @, carets ^, tildes ~, pipes |, and the odd ampersand & or star *.
Ellipses... and question marks?! Sometimes people write <tags> or key=value pairs.

A few words are not plain ASCII. We met at a café in the old town; the waiter was naïve
about the menu but friendly. Next spring we fly to 東京 and then to Zürich, where the
crème brûlée is said to be excellent. Some messages end with an emoji 🙂 or two 🎉🚀, and
some use Greek letters like α, β and λ, or symbols such as €, £, ° and ±.

Streaming text back to a client is harder than it looks. A single character may span
several tokens, so the server must not print half of it; and a token may begin with a
space, so the server must not drop it either. The safe way is to decode a small window of
recent tokens, compare it with what was already sent, and emit only the new suffix once
it no longer ends with a broken character.

Short lines help as well.
Hello, world.
The quick brown fox jumps over the lazy dog.
She sells sea shells by the sea shore.
One, two, three, four, five; six, seven, eight, nine, ten.
"""


def train_demo_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE on DEMO_CORPUS: specials <s>,<pad>,</s>,<unk> = 0..3."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(DEMO_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def save_demo_tokenizer(directory: str | Path, vocab_size: int = 512) -> Path:
    """Write the demo tokenizer to `directory` as tokenizer.json + tokenizer_config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train_demo_tokenizer(vocab_size).save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "</s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "model_max_length": 2048,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
