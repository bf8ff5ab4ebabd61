"""Train a small byte-level BPE tokenizer with the special tokens and chat template alignkit expects.

The built-in tasks train tiny models from scratch, so they need a tokenizer that is built offline
from their own corpus. The result is an ordinary ``transformers`` tokenizer: it saves with
``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained``.

BOS policy: the tokenizer adds BOS itself. ``tokenizer(text)`` gives ``[bos, ...]`` for a single
sequence (``add_bos_token=True``, a ``TemplateProcessing`` post-processor) and never adds EOS.
The chat template writes ``bos_token`` as its first characters, and ``apply_chat_template``
tokenises the rendered text with ``add_special_tokens=False``, so a chat also starts with exactly
one BOS. The data layer (``alignkit.data.formats``) follows the same rules and never adds BOS on
top of a tokenizer that already did.

Chat layout (one line per turn here only for reading; no newlines are inserted)::

    <|bos|><|system|>You are terse.<|user|>Hi<|assistant|>Hello.<|eos|><|user|>...

A role marker opens each turn; the next marker closes it. Assistant turns also end with EOS,
because EOS is what stops generation. ``add_generation_prompt=True`` appends ``<|assistant|>``,
so the prompt fed to the model at generation time is byte-for-byte the training prefix.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_MARKERS.values())

# Unknown roles fail loudly at render time instead of silently producing an unmarked turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; every digit is its own token.

    Ids 0..5 are ``<|pad|> <|bos|> <|eos|> <|system|> <|user|> <|assistant|>``; pad and eos are
    distinct so that padding can never be confused with (and mask) a real end-of-sequence target.
    ``vocab_size`` counts the special tokens and the 256 byte symbols.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + special tokens), got {vocab_size}")

    backend = Tokenizer(models.BPE())
    # No normaliser and no prefix space: decode(encode(text)) must give back text exactly.
    # Digits are split one per token (as Llama and PaLM do), so "37 + 45" is digit by digit and
    # a model can learn column arithmetic instead of a lookup table of multi-digit tokens.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is in the vocabulary even if the corpus never shows it: no unknown tokens.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_MARKERS.values()),
        # Makes transformers install the BOS-prepending post-processor. It is saved in
        # tokenizer.json (transformers v5 drops add_bos_token from tokenizer_config.json), so a
        # reloaded tokenizer adds BOS too, even though its ``add_bos_token`` attribute reads False.
        add_bos_token=True,
        add_eos_token=False,
        # Cleaning up spaces (" ." -> ".") would break the exact byte-level round trip.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )
