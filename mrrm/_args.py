"""What the command-line tools (and the RL reward functions) share: argument types, the model
arguments with their one set of defaults, and loading a model from them."""
from __future__ import annotations

import argparse

from mrrm._io import DEFAULT_MAX_LINE_BYTES
from mrrm.common import MODES

DTYPES = ("float32", "bfloat16", "float16")


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def doc_epilog(doc: str, start: str) -> str:
    """A command's --help epilog: its module docstring from the first line that begins with `start` (a
    heading or a sentence, so the epilog starts with a capital), to the end."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(start):
            return "\n".join(lines[i:]).strip()
    raise ValueError(f"doc_epilog: no line of the docstring begins with {start!r}")


def add_workers_arg(ap: argparse.ArgumentParser) -> None:
    """--workers N (score, eval): encoding in worker processes ahead of the model (mrrm.data.pipeline)."""
    ap.add_argument("--workers", type=non_negative_int, default=0,
                    help="encode (tokenize, decode media) in N worker processes ahead of the model (default 0: "
                         "in this process); pays with the model on a GPU and spare CPU cores")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model, --mode, --max-batch-tokens, --device, --dtype, --verify: the same flags, defaults and help
    in every command that scores (score, eval, serve); load_model(..., verify=args.verify) honours --verify."""
    ap.add_argument("--model", default=None,
                    help="checkpoint directory (mrrm or the paper's layout) or Hugging Face Hub id (org/name, "
                         "org/name@revision); default: the built-in default model")
    ap.add_argument("--mode", choices=MODES, default=None, help="scoring mode (default: the model's, joint)")
    ap.add_argument("--max-batch-tokens", type=positive_int, default=None,
                    help="token budget of one packed forward pass (default: the model's)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: as loaded)")
    ap.add_argument("--verify", action="store_true",
                    help="check every file of the checkpoint against the checksums.sha256 that save_pretrained "
                         "writes before loading (a damaged or changed file is an error naming it); off by default: "
                         "it reads every byte once more")


# flag -> the mrrm.data.encoding.TextBudgets field it sets
TEXT_BUDGET_FLAGS = {
    "max_text_chars": "sample_chars",
    "max_response_chars": "response_chars",
    "max_text_bytes": "sample_bytes",
    "max_response_bytes": "response_bytes",
}


def add_text_budget_args(ap: argparse.ArgumentParser, *, line_reader: bool = True) -> None:
    """--max-text-chars ... --max-response-bytes (the model encoder's TextBudgets, checked before tokenizing)
    and, for commands that read JSONL, --max-line-bytes (mrrm._io.bounded_lines): the same flags in every
    command that reads samples."""

    helps = {
        "max_text_chars": "characters of a sample's prompt and responses together",
        "max_response_chars": "characters of one response",
        "max_text_bytes": "UTF-8 bytes of a sample's prompt and responses together",
        "max_response_bytes": "UTF-8 bytes of one response",
    }
    for flag in TEXT_BUDGET_FLAGS:
        default = ("default: the model's, from its tokenizer: more characters never fit its max_length"
                   if "chars" in flag else "default: 4 per character of the character budget, UTF-8's most")
        ap.add_argument("--" + flag.replace("_", "-"), type=positive_int, default=None,
                        help=f"text budget, checked before tokenizing: {helps[flag]} ({default})")
    if line_reader:
        ap.add_argument("--max-line-bytes", type=positive_int, default=DEFAULT_MAX_LINE_BYTES,
                        help="longest input line read into memory, in bytes; a longer line is an error of that line, "
                             f"passed over without being held (default {DEFAULT_MAX_LINE_BYTES}: 16 MiB)")


def text_budget_overrides(values) -> dict:
    """The TextBudgets fields given as flags (a dict or argparse namespace; None = the model's default)."""
    values = vars(values) if isinstance(values, argparse.Namespace) else values
    return {field: values[flag] for flag, field in TEXT_BUDGET_FLAGS.items() if values.get(flag) is not None}
