"""griffe extension for the API reference: docstring examples (`>>>` lines and their output) are
shown as code blocks, as doctest reads them, rather than as markdown prose."""

from __future__ import annotations

import griffe


def fence_examples(text: str) -> str:
    """Wrap each run of `>>>` / `...` lines and the output after it (up to a blank line) in a
    ```pycon fence, keeping its indentation."""
    out, block, indent = [], [], ""
    for line in text.splitlines():
        stripped = line.lstrip()
        if not block and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            block = [line]
        elif block and stripped:
            block.append(line)
        else:
            if block:
                out += [f"{indent}```pycon", *block, f"{indent}```"]
                block = []
            out.append(line)
    if block:
        out += [f"{indent}```pycon", *block, f"{indent}```"]
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_examples(obj.docstring.value)
