"""fedctl._yaml: safe YAML for configuration (no anchors/aliases, bounded depth and size)."""

from __future__ import annotations

import time

import pytest

from fedctl._yaml import YAMLInputError, dump_yaml, load_yaml

#: 9 levels of 9 aliases: ~387 million strings if expanded
BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)


def refused(text: str | bytes, **kw: int) -> YAMLInputError:
    start = time.monotonic()
    with pytest.raises(YAMLInputError) as info:
        load_yaml(text, source="f.yml", **kw)
    assert time.monotonic() - start < 5  # a hang, not a speed check
    assert "\n" not in str(info.value)
    return info.value


def test_data_and_key_lines() -> None:
    doc = load_yaml("a: 1\nb:\n  - x: 1\n    y: [1, 2]\n  - z\n")
    assert doc.data == {"a": 1, "b": [{"x": 1, "y": [1, 2]}, "z"]}
    assert doc.lines == {
        "": 1,
        "a": 1,
        "b": 2,
        "b[0]": 3,
        "b[0].x": 3,
        "b[0].y": 4,
        "b[0].y[0]": 4,
        "b[0].y[1]": 4,
        "b[1]": 5,
    }
    data, lines = load_yaml(b"# comment only\n")
    assert data is None and lines == {}


def test_alias_bomb_refused_at_the_first_anchor() -> None:
    assert len(BOMB) < 400
    err = refused(BOMB)
    assert str(err) == "f.yml:1: YAML anchors and aliases are not allowed (found anchor '&a')"
    assert err.line == 1 and err.source == "f.yml"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: &a [*a]\n", "f.yml:1: YAML anchors and aliases are not allowed (found anchor '&a')"),
        ("a: 1\nb: *x\n", "f.yml:2: YAML anchors and aliases are not allowed (found alias '*x')"),
        (
            "a: 1\nb: &x 2\n",
            "f.yml:2: YAML anchors and aliases are not allowed (found anchor '&x')",
        ),
        (
            "base: {x: 1}\nc:\n  <<: *base\n",
            "f.yml:3: YAML anchors and aliases are not allowed (found alias '*base')",
        ),
    ],
    ids=["recursive", "alias", "anchor-only", "merge-key"],
)
def test_anchors_and_aliases_refused(text: str, expected: str) -> None:
    assert str(refused(text)) == expected


def test_nesting_is_bounded() -> None:
    assert load_yaml("[" * 64 + "]" * 64).data is not None
    assert str(refused("[" * 65 + "]" * 65)) == "f.yml:1: nested more than 64 levels deep"
    assert str(refused("[" * 100_000)) == "f.yml:1: nested more than 64 levels deep"
    block = "".join("  " * i + "k:\n" for i in range(10))
    assert str(refused(block, max_depth=5)) == "f.yml:6: nested more than 5 levels deep"


def test_size_is_bounded() -> None:
    assert (
        str(refused("a: " + "x" * 100, max_bytes=64))
        == "f.yml: too large (103 bytes, limit 64 bytes)"
    )
    assert str(refused(b"x" * (2 << 20))) == "f.yml: too large (2097152 bytes, limit 1 MiB)"


def test_duplicate_keys_refused_with_their_path() -> None:
    err = refused("a: 1\nb:\n  c: 1\n  c: 2\n")
    assert str(err) == "f.yml:4: b.c: duplicate key (first on line 3)"
    assert (err.key, err.line, err.problem) == ("b.c", 4, "duplicate key (first on line 3)")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "a: 1\n b: 2\n",
            "f.yml:2: YAML syntax error: mapping values are not allowed here (column 3)",
        ),
        ("a: 1\n---\nb: 2\n", "f.yml:2: YAML syntax error: but found another document (column 1)"),
        (
            "a: !!python/object/apply:os.system ['true']\n",
            "f.yml:1: YAML syntax error: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object/apply:os.system' (column 4)",
        ),
        (
            "a: 1\nb: \x00\n",
            "f.yml:2: YAML syntax error: unacceptable character #x0000: special characters "
            "are not allowed",
        ),
        ("a: 1\nb: 2024-13-45\n", "f.yml:2: invalid value: month must be in 1..12"),
        (b"a: \xff\n", "f.yml: not UTF-8 text (byte 3)"),
    ],
    ids=["syntax", "two-documents", "python-tag", "nul", "bad-date", "not-utf8"],
)
def test_other_problems_are_one_line(text: str | bytes, expected: str) -> None:
    assert str(refused(text)) == expected


def test_huge_integer_is_an_error_not_a_traceback() -> None:
    err = refused("a: 1\nb: " + "1" * 5000 + "\n")
    assert err.line == 2 and err.problem.startswith("invalid value: ")


def test_dump_writes_shared_objects_out_and_reads_back() -> None:
    shared = [0, 1]
    data = {"x": {"gpus": shared}, "y": {"gpus": shared}, "name": "ü"}
    text = dump_yaml(data)
    assert "&" not in text and "*" not in text and "ü" in text
    assert list(load_yaml(text).data) == ["x", "y", "name"]
    assert load_yaml(text).data == data


@pytest.mark.parametrize(
    "text",
    [
        "a: !!timestamp x\n",
        'a: !!timestamp ""\n',
        "a: !!bool x\n",
        'a: !!int ""\n',
        "a: !!int +\n",
        'a: !!float ""\n',
    ],
)
def test_explicit_tags_pyyaml_cannot_parse_are_errors(text: str) -> None:
    """Found by tests/test_fuzz.py: PyYAML raised AttributeError, KeyError or IndexError."""
    err = refused(text)
    assert err.line == 1 and err.problem.startswith("invalid value: ")
