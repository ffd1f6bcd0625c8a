"""The versions of the optional libraries a run or a benchmark may use (the peer transformers + PEFT,
tokenizers, torchao), as reports record them: a version, ``None`` when the library is not installed, or
``"broken: <error>"`` when it is there but fails to import."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Sequence

from lora.quantize import import_torchao_quietly

__all__ = ["library_versions"]


def library_versions(names: Sequence[str]) -> dict[str, str | None]:
    """``{name: version, None (not installed) or "broken: <error>"}``. Broken is, for example, transformers'
    peers when a copied torchao lacks its ``.dist-info``: they read torchao's version at import."""
    # torchao imported quietly first (transformers and peft import it when it is there); broken, it is
    # reported below, in its own row or a peer's
    with contextlib.suppress(Exception):
        import_torchao_quietly()
    versions: dict[str, str | None] = {}
    for name in names:
        if importlib.util.find_spec(name) is None:
            versions[name] = None
            continue
        try:
            versions[name] = str(importlib.import_module(name).__version__)
        except Exception as e:  # recorded in the report, not raised: the rest of the run does not need it
            versions[name] = f"broken: {type(e).__name__}: {e}".splitlines()[0]
    return versions
