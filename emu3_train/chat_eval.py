"""Answer accuracy of a chat model on held-out chat shards: greedy answers, exact match per question type.

Every document of ``--data`` with ``loss_spans`` (``data_pipelines.tokenize_chat`` or
``data_pipelines.demo_chat`` output) is asked each of its questions: the prompt is the document up
to the answer (``emu3_train.chat``'s layout, ending ``". ASSISTANT:"``; later turns see the
reference history), the model answers greedily over text ids until EOS (the generation engine,
KV-cached, in batches of ``--batch-size``), and the answer counts as right when it equals the
reference after trimming whitespace, a final ``.`` and case. Accuracy is reported per
``question_type`` of the sample json (``all`` when absent) and overall.

    python -m emu3_train.chat_eval runs/demo-chat/ckpt/latest --data data/demo_chat/eval \\
        --out runs/demo-chat/eval.json
    python -m emu3_train.chat_eval hf/demo-chat --data data/demo_chat/eval --limit 90

Prints one line ``chat eval: digit 0.950 | parity 0.983 | ...`` and writes, with ``--out``,
``{"accuracy": {type: fraction}, "overall": ..., "answers": {type: count}, "examples": [...]}``.
Deterministic (greedy).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from emu3_train.data.stream import ShardSet
from emu3_train.generation import generate_text
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import PRESETS, Vocab, get_vocab


def normalize(text: str) -> str:
    """Answer text as compared: trimmed, without a final period, lower case."""
    return text.strip().rstrip(".").strip().lower()


def questions(shards: ShardSet, decode, limit: int | None = None) -> list[dict]:
    """``{"prompt", "reference", "type"}`` per supervised answer of the shards (documents in order)."""
    out = []
    for d in range(len(shards)):
        spans = shards.loss_spans(d)
        if not len(spans):
            continue
        tokens, meta = shards.read(d)
        for start, end in spans:
            reference = tokens[start:end]
            if len(reference) and reference[-1] == shards.vocab.eos:
                reference = reference[:-1]
            out.append({"prompt": tokens[:start].tolist(), "reference": decode(reference),
                        "type": str(meta.get("question_type", "all")), "doc": d})
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def evaluate_chat(model, vocab: Vocab, data: str | Path, *, batch_size: int = 64, limit: int | None = None,
                  max_new_tokens: int = 32, device="cpu") -> dict:
    """Accuracy per question type of ``model`` on the chat shards in ``data`` (module docstring)."""
    tok = load_tokenizer(vocab)
    items = questions(ShardSet(data, vocab), tok.decode, limit)
    if not items:
        raise ValueError(f"{data}: no document with loss_spans (chat answers) to evaluate")
    allowed = torch.zeros(vocab.size, dtype=torch.bool)
    allowed[: vocab.text_size] = True
    allowed[vocab.eos] = True
    order = sorted(range(len(items)), key=lambda i: len(items[i]["prompt"]))  # similar lengths batch well
    for b in range(0, len(order), batch_size):
        batch = [items[i] for i in order[b:b + batch_size]]
        answers = generate_text(model, vocab, [it["prompt"] for it in batch], max_new_tokens,
                                allowed=allowed, device=device)
        for it, ids in zip(batch, answers):
            it["answer"] = tok.decode(ids)
    right, count = defaultdict(int), defaultdict(int)
    for it in items:
        count[it["type"]] += 1
        right[it["type"]] += normalize(it["answer"]) == normalize(it["reference"])
    return {
        "accuracy": {k: right[k] / count[k] for k in sorted(count)},
        "overall": sum(right.values()) / len(items),
        "answers": dict(sorted(count.items())),
        "examples": [{k: it[k] for k in ("type", "reference", "answer")} for it in items[:6]],
    }


def main(argv: list[str] | None = None) -> int:
    from emu3_train.model_source import load_model

    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.chat_eval",
        description="Greedy answer accuracy per question type on held-out chat shards.",
        epilog="example: python -m emu3_train.chat_eval runs/demo-chat/ckpt/latest "
               "--data data/demo_chat/eval --out runs/demo-chat/eval.json",
    )
    parser.add_argument("source", help="a run's ckpt folder, ckpt/latest, ckpt/step_N, or an HF folder")
    parser.add_argument("--data", required=True, help="directory of chat shards (*.tar + *.idx)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--vocab", choices=sorted(PRESETS), default=None,
                        help="vocabulary preset (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=64, help="questions answered together")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N answers only")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer generated")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    src = load_model(args.source, device=args.device)
    vocab = get_vocab(args.vocab) if args.vocab else src.vocab
    if vocab is None:
        parser.error(f"{args.source}: its vocabulary is unknown; pass --vocab")
    result = evaluate_chat(src.model, vocab, args.data, batch_size=args.batch_size, limit=args.limit,
                           max_new_tokens=args.max_new_tokens, device=args.device)
    result = {"source": str(args.source), "step": src.step, "data": str(args.data), **result}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    per_type = " | ".join(f"{k} {v:.3f}" for k, v in result["accuracy"].items())
    print(f"chat eval: {per_type} | overall {result['overall']:.3f} ({sum(result['answers'].values())} "
          f"answers{', ' + str(args.out) if args.out else ''})")
    return 0


if __name__ == "__main__":
    from emu3_train.config import ConfigError

    try:
        sys.exit(main())
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
