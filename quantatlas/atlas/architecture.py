"""A model's architecture, the axis findings are judged across (issue 27): the family its config names
(`model_type`: qwen3, llama, qwen3_moe, mixtral, ...), recorded with every run by the runner (the result
field `model_arch`, kept in the run's `extra` so exports, imports and pushes carry it) and stored on the
run set (`run_set.model_arch`). Run sets stored before it was recorded have none: of unknown architecture.
No torch.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from quantatlas.errors import UserError

#: what a recorded architecture may be: a config's model_type (letters, digits, _ . -), at most 64 characters
ARCH_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
#: the architecture of a model whose runs recorded none (or disagreeing ones): never counted as a distinct one
UNKNOWN = "unknown"


def check_model_arch(value: Any, where: str = "model_arch") -> str:
    """`value` as a recorded architecture, or UserError naming `where` and the value (type, length, characters)."""
    if not isinstance(value, str):
        raise UserError(f"{where}: must be a string (a config's model_type), got {type(value).__name__}", where)
    if not ARCH_PATTERN.match(value) or value == UNKNOWN:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise UserError(f"{where}: {shown!r} is not an architecture name (1 to 64 letters, digits, _ . -, not "
                        f"{UNKNOWN!r})", where)
    return value


def architecture_of(recorded: Iterable[str | None]) -> str:
    """The architecture of one model from what its run sets recorded: the one name they agree on, else
    UNKNOWN (none recorded: run sets stored before `model_arch`; several: a model name that loaded different
    models, such as a local folder on two machines)."""
    names = {a for a in recorded if a is not None}
    return names.pop() if len(names) == 1 else UNKNOWN
