"""What ``tokenize_chat`` reads: LLaVA-format conversation records, checked into :class:`Conversation`.

A record (LLaVA's ``llava_v1_5_mix665k.json`` and its kin)::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

:func:`load_records` reads a ``.json`` file (a list of records) or ``.jsonl`` (one per line; a line
that is not JSON becomes a :class:`BadLine`, reported as ``bad_json`` for that line only).
:func:`parse_conversation` checks a record and raises :class:`BadConversation` (``reason``:
the count key of ``work.Skips``, message: what is wrong) on: not an object or no
``conversations`` list (``bad_conversation``), a ``from`` other than human/user/gpt/assistant
(a ``system`` message only first; ``unknown_role``), two user or two assistant messages in a row
or an assistant first (``turns_out_of_order``), no assistant message (``no_assistant_turn``), a
last question without its answer (``unanswered_turn``), a value that is not text or is empty
(``empty_turn``), ``<image>`` without an ``image`` field (``placeholder_without_image``), an
``image`` without ``<image>`` (``image_without_placeholder``), more than one ``<image>``
(``several_placeholders``), ``<image>`` in an answer (``placeholder_in_answer``), a list of
several images (``several_images``), an image file that does not exist (``missing_image``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from emu3_train.chat import SYSTEM, Turn

IMAGE_PLACEHOLDER = "<image>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class BadConversation(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BadLine:
    """A ``.jsonl`` line that is not JSON (kept in place so positions stay the line numbers)."""

    error: str


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    image: str | None = None  # the record's image path as written
    image_path: Path | None = None  # where the file is (under --image-folder)
    image_turn: int = 0
    system: str = SYSTEM
    id: str | None = None


def load_records(path: str | os.PathLike) -> list:
    """The records of a ``.json`` (a list) or ``.jsonl`` file; ``ValueError`` naming the file when a
    ``.json`` file is not a JSON list (the file itself is unusable, not one conversation)."""
    path = Path(path)
    if path.name.lower().endswith(".jsonl"):
        out: list = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    out.append(BadLine(str(e)))
        return out
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a list of LLaVA conversations") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, expected a list of conversations")
    return data


def _strip_placeholder(text: str) -> str:
    """The question without ``<image>`` and the whitespace (LLaVA's ``\\n``) next to it."""
    before, _, after = text.partition(IMAGE_PLACEHOLDER)
    before, after = before.rstrip(), after.lstrip()
    return f"{before} {after}".strip() if before and after else (before or after)


def parse_conversation(record, image_folder: str | os.PathLike | None = None) -> Conversation:
    """The checked :class:`Conversation` of one record, else :class:`BadConversation` (module docstring)."""
    if isinstance(record, BadLine):
        raise BadConversation("bad_json", f"line is not JSON ({record.error})")
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise BadConversation("bad_conversation", "expected an object with a 'conversations' list")
    messages = list(record["conversations"])
    system = SYSTEM
    if messages and isinstance(messages[0], dict) and messages[0].get("from") == "system":
        system = messages.pop(0).get("value")
        if not isinstance(system, str) or not system.strip():
            raise BadConversation("empty_turn", "the system message has no text")
    questions, answers = [], []
    for i, m in enumerate(messages):
        role = m.get("from") if isinstance(m, dict) else None
        value = m.get("value") if isinstance(m, dict) else None
        if role in USER_ROLES:
            kind = "user"
        elif role in ASSISTANT_ROLES:
            kind = "assistant"
        else:
            raise BadConversation("unknown_role", f"message {i} is from {role!r}; expected human/user or "
                                                  "gpt/assistant (system only first)")
        if not isinstance(value, str) or not value.strip():
            raise BadConversation("empty_turn", f"message {i} ({role}) has no text")
        expected = "user" if len(questions) == len(answers) else "assistant"
        if kind != expected:
            raise BadConversation("turns_out_of_order", f"message {i} is from {role!r} but a {expected} "
                                                        "message was expected (turns alternate, user first)")
        (questions if kind == "user" else answers).append(value)
    if not answers:
        raise BadConversation("no_assistant_turn", "the conversation has no assistant (gpt) answer")
    if len(questions) > len(answers):
        raise BadConversation("unanswered_turn", f"the last question (message {len(messages) - 1}) has no "
                                                 "answer")
    if any(IMAGE_PLACEHOLDER in a for a in answers):
        raise BadConversation("placeholder_in_answer", f"an answer holds {IMAGE_PLACEHOLDER}")
    marks = [q.count(IMAGE_PLACEHOLDER) for q in questions]
    image = record.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            raise BadConversation("several_images", f"the record lists {len(image)} images; one is supported")
        image = image[0]
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise BadConversation("missing_image", f"field 'image' is {image!r}, not a path")
    if sum(marks) > 1:
        raise BadConversation("several_placeholders", f"{sum(marks)} {IMAGE_PLACEHOLDER} placeholders; "
                                                      "one image per conversation is supported")
    if image is None and sum(marks):
        raise BadConversation("placeholder_without_image", f"a question holds {IMAGE_PLACEHOLDER} but the "
                                                           "record has no 'image'")
    if image is not None and not sum(marks):
        raise BadConversation("image_without_placeholder", f"the record has image {image!r} but no question "
                                                           f"holds {IMAGE_PLACEHOLDER}")
    image_turn = marks.index(1) if image is not None else 0
    questions = [_strip_placeholder(q) if i == image_turn and image is not None else q.strip()
                 for i, q in enumerate(questions)]
    if not all(questions):
        raise BadConversation("empty_turn", "a question is empty once its placeholder is removed")
    turns = tuple(Turn(q, a.strip()) for q, a in zip(questions, answers))
    image_path = None
    if image is not None:
        image_path = Path(image_folder) / image if image_folder is not None else Path(image)
        if not image_path.is_file():
            raise BadConversation("missing_image", f"image file {image_path} does not exist")
    ident = record.get("id")
    return Conversation(turns, image, image_path, image_turn, system.strip(),
                        None if ident is None else str(ident))
