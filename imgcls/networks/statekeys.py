"""What a failed `load_state_dict` names, in a line a user can act on: the keys missing, unexpected or of the
wrong shape (weights files, timm checkpoints)."""

from __future__ import annotations

import re

from imgcls.errors import first_line


def mismatched_keys(e: BaseException) -> dict[str, list[str]]:
    """The keys a failed load_state_dict names: missing, unexpected, of the wrong shape."""
    text = str(e)
    found = {what: re.findall(r'"([^"]+)"', m.group(1)) for what in ("missing", "unexpected")
             if (m := re.search(what.capitalize() + r" key\(s\) in state_dict: (.*)", text))}
    return {**found, "wrong shape": re.findall(r"size mismatch for ([^:\s]+):", text)}


def mismatch(e: BaseException) -> str:
    """What a failed load_state_dict names (three keys of each kind), or the error's first line."""
    return keys_named(mismatched_keys(e)) or f"{type(e).__name__}: {first_line(e)}"


def keys_named(found: dict[str, list[str]]) -> str:
    """'missing: a, b; unexpected: c...': the first three keys of each kind of mismatch."""
    return "; ".join(f"{what}: {', '.join(keys[:3])}{'...' if len(keys) > 3 else ''}"
                     for what, keys in found.items() if keys)
