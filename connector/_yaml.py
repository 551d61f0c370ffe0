"""YAML loading that remembers where each key was written, so errors can name the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from connector.errors import Problem

Location = tuple[str | int, ...]


class LoadedYaml:
    """A parsed YAML document and the line of every key and list item in it."""

    def __init__(self, data: Any, lines: dict[Location, int]) -> None:
        self.data = data
        self.lines = lines

    def line_of(self, loc: Location) -> int | None:
        """The line of ``loc``, or of its nearest parent that has one."""
        while True:
            if loc in self.lines:
                return self.lines[loc]
            if not loc:
                return None
            loc = loc[:-1]


def load_yaml(path: Path) -> LoadedYaml:
    """Read and parse ``path``; a syntax error or an unreadable file is a one-problem list."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlProblem(Problem("file", "does not exist")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise YamlProblem(Problem("file", f"cannot be read ({exc.__class__.__name__})")) from None
    return parse_yaml(text)


def parse_yaml(text: str) -> LoadedYaml:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise YamlProblem(Problem("YAML syntax", str(exc.problem or exc), line)) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(Problem("YAML syntax", str(exc))) from None
    finally:
        loader.dispose()
    lines: dict[Location, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return LoadedYaml(data, lines)


def _walk(node: yaml.Node, loc: Location, lines: dict[Location, int]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
                lines[(*loc, key)] = key_node.start_mark.line + 1
                _walk(value_node, (*loc, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*loc, index), lines)


class YamlProblem(Exception):
    """Raised by the loaders here; callers wrap it in their own error with the file name."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        super().__init__(str(problem))
