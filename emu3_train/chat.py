"""The Emu3-Chat conversation layout: one builder for training documents and generation prompts.

BAAI's ``Emu3Processor`` (``emu3/mllm/processing_emu3.py``, understanding mode) prompts Emu3-Chat with

    BOS "You are a helpful assistant. USER: " <image block> question ". ASSISTANT:"

and the model answers until EOS. We follow it exactly (the ``"."`` after the user's text is BAAI's:
their template is ``"... USER: {image_prompt}{text_prompt}. ASSISTANT:"``) and extend it to several
turns the way the Hugging Face ``Emu3-Chat-hf`` template joins them (one space between turns):

    BOS "You are a helpful assistant. USER: " [image block] q1 ". ASSISTANT:" " a1" EOS
        " USER: " q2 ". ASSISTANT:" " a2" EOS ...

- the image block (``layout.vision_block``: ``SOV "h*w" SOT rows EOF EOV``) opens the turn that
  holds the image, right after ``"USER: "`` (BAAI puts it before the text; LLaVA's own
  preprocessing moves ``<image>`` to the front too);
- each answer is encoded as ``" " + answer`` (so a prompt ending ``"ASSISTANT:"`` is followed by
  exactly the tokens the model must produce) and ends with EOS;
- ``loss_spans`` (``data.format``) cover every answer's tokens and its EOS: ``[[first answer
  token, EOS + 1], ...]``; the system line, questions and image are context only.

Text is encoded piece by piece; the pieces meet at special tokens or before the space that starts
an answer, where Qwen's pre-tokenizer splits anyway, so the ids equal those of the whole string.

    >>> from emu3_train.vocab import get_vocab
    >>> from emu3_train.tokenizer import load_tokenizer
    >>> v = get_vocab("demo"); tok = load_tokenizer(v)
    >>> doc = chat_document(v, tok.encode, [Turn("Hi", "Hello")])
    >>> tok.decode(doc.tokens[1:doc.loss_spans[0][0]]), tok.decode(doc.tokens[doc.loss_spans[0][0]:-1])
    ('You are a helpful assistant. USER: Hi. ASSISTANT:', ' Hello')
    >>> prompt = chat_prompt(v, tok.encode, "Hi")
    >>> prompt == doc.tokens[:doc.loss_spans[0][0]]
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from emu3_train.layout import vision_block
from emu3_train.vocab import Vocab

Encode = Callable[[str], list[int]]

SYSTEM = "You are a helpful assistant."
USER = "USER: "
ASSISTANT = ". ASSISTANT:"
TURN_SEPARATOR = " "


@dataclass(frozen=True)
class Turn:
    """One exchange: the user's ``question`` and the assistant's ``answer`` (None: to be generated)."""

    question: str
    answer: str | None = None


@dataclass(frozen=True)
class ChatDocument:
    """Token ids of a conversation and the ``[start, end)`` spans of its answers (each with its EOS)."""

    tokens: list[int]
    loss_spans: list[list[int]]


def _build(vocab: Vocab, encode: Encode, turns: Sequence[Turn], codes: np.ndarray | None,
           image_turn: int, system: str) -> ChatDocument:
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    if codes is not None and not 0 <= image_turn < len(turns):
        raise ValueError(f"image_turn={image_turn} is not one of the {len(turns)} turns")
    tokens = [vocab.bos]
    spans: list[list[int]] = []
    for i, turn in enumerate(turns):
        opening = (system + TURN_SEPARATOR if i == 0 else TURN_SEPARATOR) + USER
        if codes is not None and i == image_turn:  # BAAI: "USER: " <image block> question
            tokens += [*encode(opening), *vision_block(vocab, codes, encode), *encode(turn.question + ASSISTANT)]
        else:  # one piece: "USER: " and the question's first word are not split apart
            tokens += encode(opening + turn.question + ASSISTANT)
        if turn.answer is None:
            if i != len(turns) - 1:
                raise ValueError(f"turn {i} has no answer but is not the last turn")
            break
        start = len(tokens)
        tokens += encode(" " + turn.answer)
        tokens.append(vocab.eos)
        spans.append([start, len(tokens)])
    return ChatDocument(tokens, spans)


def chat_document(vocab: Vocab, encode: Encode, turns: Sequence[Turn], codes: np.ndarray | None = None,
                  image_turn: int = 0, system: str = SYSTEM) -> ChatDocument:
    """The training document of a conversation (module docstring); every turn needs its answer.

    ``codes``: the image's visual codes ``[h, w]`` (None: a text-only conversation), placed in
    turn ``image_turn``.
    """
    missing = [i for i, t in enumerate(turns) if t.answer is None]
    if missing:
        raise ValueError(f"turn {missing[0]} of the conversation has no answer")
    return _build(vocab, encode, turns, codes, image_turn, system)


def chat_prompt(vocab: Vocab, encode: Encode, question: str, codes: np.ndarray | None = None,
                history: Sequence[Turn] = (), image_turn: int = 0, system: str = SYSTEM) -> list[int]:
    """Tokens that ask ``question`` after the answered ``history``, ending ``". ASSISTANT:"``: what
    the model continues with its answer and EOS (``generation.generate_text``)."""
    return _build(vocab, encode, [*history, Turn(question)], codes, image_turn, system).tokens
