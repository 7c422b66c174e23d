"""The configuration reference, generated from the dataclasses in configs/schema.py.

``python -m configs.reference`` prints Markdown: one table per section (``model``, ``reward.sandbox``, ...) with
every key, its default, its type or choices and the comment written next to it in the schema. A field's comment is
its end-of-line comment plus the comment-only lines right below it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize

from configs.schema import RunConfig, field_types, literal_choices


@functools.cache
def _comments(module) -> dict[str, dict[str, str]]:
    """{class name: {field name: comment}} read from the source of ``module`` (a section's class may live outside
    configs/schema.py, e.g. configs/logging_section.py or a loss's module)."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    by_line = {tok.start[0]: tok.string.lstrip("#").strip()
               for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        fields = out.setdefault(node.name, {})
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            parts, line = [by_line.get(stmt.end_lineno, "")], stmt.end_lineno + 1
            while line in by_line and lines[line - 1].lstrip().startswith("#"):
                parts.append(by_line[line])
                line += 1
            fields[stmt.target.id] = " ".join(p for p in parts if p)
    return out


def _type_text(cls: type, f: dataclasses.Field) -> str:
    choices = literal_choices(field_types(cls)[f.name])
    if choices is not None:
        return "one of " + ", ".join(f'"{c}"' if c == "" else str(c) for c in choices)
    text = str(f.type)
    return f"{text[len('Optional['):-1]} or null" if text.startswith("Optional[") else text


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
        return '""' if value == "" else "null" if value is None else str(value).lower() if isinstance(value, bool) \
            else str(value)
    return "(see below)"


def sections(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, type]]:
    """Every config class in the tree with its key prefix, parents first: [("", RunConfig), ("model.", ...), ...]."""
    out = [(prefix, cls)]
    for name, kind in field_types(cls).items():
        if dataclasses.is_dataclass(kind):
            out += sections(kind, f"{prefix}{name}.")
    return out


def markdown() -> str:
    """The whole reference as Markdown."""
    out = ["# Configuration reference", "",
           "Generated from configs/schema.py by `python -m configs.reference`; every key is set as `key=value`.", ""]
    for prefix, cls in sections():
        out += [f"## {prefix.rstrip('.') or '(top level)'}", ""]
        doc = inspect.getdoc(cls) or ""
        if not doc.startswith(f"{cls.__name__}("):  # dataclass() writes the signature where no docstring is
            out += [" ".join(doc.split()), ""]
        out += ["| key | default | type | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(field_types(cls)[f.name]):
                continue
            text = _comments(inspect.getmodule(cls)).get(cls.__name__, {}).get(f.name, "")
            cells = [f"`{prefix}{f.name}`", f"`{_default_text(f)}`", _type_text(cls, f), text]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
