"""Calico label selectors: parsing, evaluation, canonical text and syntax errors (ipam/selector.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipam.selector import (
    All,
    And,
    Contains,
    EndsWith,
    Equals,
    Global,
    Has,
    In,
    Not,
    NotEquals,
    NotIn,
    Or,
    Selector,
    SelectorError,
    StartsWith,
    parse_selector,
    selector_matches,
)

RACK = {"projectcalico.org/rack": "r1", "kubernetes.io/hostname": "node-1", "zone": "eu-west-1a", "a": "x"}


@pytest.mark.parametrize(("text", "labels", "expected"), [
    # all(), global() and the empty selector
    ("all()", {}, True),
    ("all( )", RACK, True),
    ("", {}, True),
    ("  \t\n ", RACK, True),
    ("global()", {}, True),
    # ==
    ("a == 'x'", {"a": "x"}, True),
    ('a == "x"', {"a": "x"}, True),
    ("a == 'x'", {"a": "y"}, False),
    ("a == 'x'", {}, False),
    ("a == ''", {"a": ""}, True),
    ("a == ''", {}, False),
    ("a=='x'", {"a": "x"}, True),
    # != is true when the label is absent
    ("a != 'x'", {"a": "y"}, True),
    ("a != 'x'", {"a": "x"}, False),
    ("a != 'x'", {}, True),
    ("a!='x'", {"b": "x"}, True),
    # has
    ("has(a)", {"a": ""}, True),
    ("has(a)", {"b": "a"}, False),
    ("has( a )", {"a": "x"}, True),
    ("!has(a)", {}, True),
    ("!has(a)", {"a": "x"}, False),
    # in / not in
    ("a in {'x', 'y'}", {"a": "y"}, True),
    ("a in {'x', 'y'}", {"a": "z"}, False),
    ("a in {'x', 'y'}", {}, False),
    ("a in {}", {"a": "x"}, False),
    ("a in{'x'}", {"a": "x"}, True),
    ("a not in {'x','y'}", {"a": "z"}, True),
    ("a not in {'x','y'}", {"a": "x"}, False),
    ("a not in {'x','y'}", {}, True),
    ("a not in {}", {"a": "x"}, True),
    # contains / starts with / ends with are false on an absent label
    ("zone contains 'west'", RACK, True),
    ("zone contains 'east'", RACK, False),
    ("zone contains ''", RACK, True),
    ("nope contains ''", RACK, False),
    ("zone starts with 'eu-'", RACK, True),
    ("zone starts with 'us-'", RACK, False),
    ("nope starts with ''", RACK, False),
    ("zone ends with '1a'", RACK, True),
    ("zone ends with '1b'", RACK, False),
    ("nope ends with ''", RACK, False),
    # negation of any term
    ("!a == 'x'", {"a": "x"}, False),
    ("!a == 'x'", {}, True),
    ("!(a == 'x')", {"a": "y"}, True),
    ("!a in {'x'}", {"a": "x"}, False),
    ("!zone starts with 'eu'", RACK, False),
    ("!!has(a)", {"a": "x"}, True),
    ("! ! ! has(a)", {"a": "x"}, False),
    ("!all()", {}, False),
    # && and ||
    ("a == 'x' && b == 'y'", {"a": "x", "b": "y"}, True),
    ("a == 'x' && b == 'y'", {"a": "x"}, False),
    ("a == 'x' || b == 'y'", {"b": "y"}, True),
    ("a == 'x' || b == 'y'", {}, False),
    ("a == 'x'&&b == 'y'||c == 'z'", {"c": "z"}, True),
    # keys with DNS prefixes, slashes, dots, dashes and underscores
    ("projectcalico.org/rack == 'r1'", RACK, True),
    ("projectcalico.org/rack == 'r2'", RACK, False),
    ("kubernetes.io/hostname in {'node-1', 'node-2'}", RACK, True),
    ("has(kubernetes.io/hostname) && !has(node-role.kubernetes.io/control-plane)", RACK, True),
    ("my_key.v-2 == 'x'", {"my_key.v-2": "x"}, True),
    ("Upper.Case == 'x'", {"Upper.Case": "x"}, True),
    # values may contain anything but their own quote
    ("a == \"it's\"", {"a": "it's"}, True),
    ("a == 'say \"hi\"'", {"a": 'say "hi"'}, True),
    ("a == ' x || y '", {"a": " x || y "}, True),
    # operator words are only keywords where the grammar expects them
    ("in == 'x' && has(has) && not != 'y'", {"in": "x", "has": ""}, True),
    ("all == 'x'", {"all": "x"}, True),
])
def test_matches(text: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(text).matches(labels) is expected
    assert selector_matches(text, labels) is expected


@pytest.mark.parametrize(("text", "labels", "expected"), [
    # && binds tighter than ||: a || (b && c)
    ("a == 'x' || b == 'y' && c == 'z'", {"a": "x"}, True),
    ("a == 'x' || b == 'y' && c == 'z'", {"b": "y"}, False),
    ("a == 'x' || b == 'y' && c == 'z'", {"b": "y", "c": "z"}, True),
    ("b == 'y' && c == 'z' || a == 'x'", {"a": "x"}, True),
    # parentheses override it: (a || b) && c
    ("(a == 'x' || b == 'y') && c == 'z'", {"a": "x"}, False),
    ("(a == 'x' || b == 'y') && c == 'z'", {"a": "x", "c": "z"}, True),
    ("((a == 'x'))", {"a": "x"}, True),
    ("( ( a == 'x' ) || ( b == 'y' ) )", {"b": "y"}, True),
    # ! binds tighter than && and ||
    ("!has(a) && has(b)", {"b": ""}, True),
    ("!has(a) && has(b)", {"a": "", "b": ""}, False),
    ("!has(a) || has(b)", {"a": "", "b": ""}, True),
    ("!(has(a) || has(b))", {"b": ""}, False),
    ("!(has(a) && has(b))", {"a": ""}, True),
])
def test_precedence_and_parentheses(text: str, labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(text, labels) is expected


@pytest.mark.parametrize(("text", "tree"), [
    ("", All()),
    ("all()", All()),
    ("global()", Global()),
    ("a == 'x' || b == 'y' && c == 'z'",
     Or((Equals("a", "x"), And((Equals("b", "y"), Equals("c", "z")))))),
    ("(a == 'x' || b == 'y') && c == 'z'",
     And((Or((Equals("a", "x"), Equals("b", "y"))), Equals("c", "z")))),
    ("a == 'x' && b == 'y' && c == 'z'", And((Equals("a", "x"), Equals("b", "y"), Equals("c", "z")))),
    ("a == 'x' && (b == 'y' && c == 'z')",
     And((Equals("a", "x"), And((Equals("b", "y"), Equals("c", "z")))))),
    ("!a == 'x'", Not(Equals("a", "x"))),
    ("!!has(a)", Not(Not(Has("a")))),
    ("a != 'x'", NotEquals("a", "x")),
    ("a in {'y', 'x', 'y'}", In("a", frozenset({"x", "y"}))),
    ("a not in {}", NotIn("a", frozenset())),
    ("a contains 'x'", Contains("a", "x")),
    ("a starts with 'x'", StartsWith("a", "x")),
    ("a ends with 'x'", EndsWith("a", "x")),
])
def test_parse_tree(text: str, tree: Selector) -> None:
    assert parse_selector(text) == tree


@pytest.mark.parametrize(("text", "canonical"), [
    ("", "all()"),
    ("  all( ) ", "all()"),
    ("global()", "global()"),
    ("has( projectcalico.org/rack )", "has(projectcalico.org/rack)"),
    ("a=='x'", 'a == "x"'),
    ("a != 'x'", 'a != "x"'),
    ("a == \"it's\"", "a == \"it's\""),
    ("a == 'say \"hi\"'", "a == 'say \"hi\"'"),
    ("a in {'y','x','y'}", 'a in {"x", "y"}'),
    ("a not in { }", "a not in {}"),
    ("a contains 'x'", 'a contains "x"'),
    ("a   starts   with 'x'", 'a starts with "x"'),
    ("a ends with 'x'", 'a ends with "x"'),
    ("!a == 'x'", '!(a == "x")'),
    ("!has(a)", "!has(a)"),
    ("!(!has(a))", "!!has(a)"),
    ("!(has(a) && has(b))", "!(has(a) && has(b))"),
    ("a == 'x' || b == 'y' && c == 'z'", 'a == "x" || b == "y" && c == "z"'),
    ("(a == 'x' || b == 'y') && c == 'z'", '(a == "x" || b == "y") && c == "z"'),
    ("((a == 'x') && (b == 'y'))", 'a == "x" && b == "y"'),
    ("a == 'x' && (b == 'y' && c == 'z')", 'a == "x" && (b == "y" && c == "z")'),
    ("a == 'x' || (b == 'y' || c == 'z')", 'a == "x" || (b == "y" || c == "z")'),
])
def test_canonical_text_round_trips(text: str, canonical: str) -> None:
    selector = parse_selector(text)
    assert str(selector) == canonical
    assert parse_selector(str(selector)) == selector


def test_nodes_are_immutable_hashable_and_cached() -> None:
    selector = parse_selector("a in {'x'} && !has(b)")
    with pytest.raises(AttributeError):
        selector.operands = ()  # type: ignore[misc]
    assert hash(selector) == hash(And((In("a", {"x"}), Not(Has("b")))))
    assert parse_selector("a in {'x'} && !has(b)") is selector
    assert In("a", ["x"]) != NotIn("a", ["x"])


@pytest.mark.parametrize(("text", "is_global"), [
    ("global()", True),
    ("!global()", True),
    ("has(a) || (b == 'x' && global())", True),
    ("all()", False),
    ("global == 'x'", False),
    ("has(global)", False),
])
def test_is_global(text: str, is_global: bool) -> None:
    assert parse_selector(text).is_global is is_global


@pytest.mark.parametrize(("text", "position", "expected"), [
    # unterminated quotes
    ("a == 'x", 5, "a closing '"),
    ('a == "x', 5, 'a closing "'),
    ("a in {'x', 'y}", 11, "a closing '"),
    # missing operands
    ("a == ", 5, "a quoted string"),
    ("a ==", 4, "a quoted string"),
    ("a == x", 5, "a quoted string"),
    ("== 'x'", 0, "a label key"),
    ("a", 1, "an operator"),
    ("a 'x'", 2, "an operator"),
    ("a == 'x' &&", 11, "a label key"),
    ("|| a == 'x'", 0, "a label key"),
    ("a == 'x' && || b == 'y'", 12, "a label key"),
    ("!", 1, "a label key"),
    ("has()", 4, "a label key"),
    ("a in 'x'", 5, "'{'"),
    ("a in {'x' 'y'}", 10, "',' or '}'"),
    ("a in {'x',}", 10, "a quoted string"),
    ("a not {'x'}", 6, "'in'"),
    ("a starts 'x'", 9, "'with'"),
    ("a ends on 'x'", 7, "'with'"),
    # trailing garbage
    ("a == 'x' b", 9, "'&&', '||' or the end of the selector"),
    ("all() all()", 6, "'&&', '||' or the end of the selector"),
    ("a == 'x' 'y'", 9, "'&&', '||' or the end of the selector"),
    ("has(a) $", 7, "a label key, quoted string or operator"),
    # single-character operators
    ("a = 'x'", 2, "'=='"),
    ("has(a) & has(b)", 7, "'&&'"),
    ("has(a) | has(b)", 7, "'||'"),
    # unknown functions and bad calls
    ("foo(a)", 0, "a function named has, all or global"),
    ("has(a) && in(x)", 10, "a function named has, all or global"),
    ("all(a)", 4, "')'"),
    ("has(a, b)", 5, "')'"),
    # unbalanced parentheses
    ("(a == 'x'", 9, "'&&', '||' or ')'"),
    ("((a == 'x') || b == 'y'", 23, "'&&', '||' or ')'"),
    ("a == 'x')", 8, "'&&', '||' or the end of the selector"),
    (")", 0, "a label key"),
    ("()", 1, "a label key"),
    # invalid label keys
    ("/a == 'x'", 0, "a valid label key"),
    ("a/ == 'x'", 0, "a valid label key"),
    ("a/b/c == 'x'", 0, "a valid label key"),
    ("-a == 'x'", 0, "a valid label key"),
    ("has(a.)", 4, "a valid label key"),
    ("Example.com/a == 'x'", 0, "a valid label key"),
    ("x == 'y' && " + "k" * 64 + " == 'x'", 12, "a valid label key"),
])
def test_syntax_errors(text: str, position: int, expected: str) -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector(text)
    error = caught.value
    message = str(error)
    assert "\n" not in message
    assert f"at position {position}" in message
    assert f"expected {expected}" in message
    assert message.startswith("invalid selector ")
    assert error.position == position and error.text == text
    assert isinstance(error, ValueError)


def test_error_message_format() -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector("a == ")
    assert str(caught.value) == 'invalid selector "a == ": expected a quoted string at position 5'
    with pytest.raises(SelectorError, match=r'found \'b\'$'):
        parse_selector("a == 'x' b")
    with pytest.raises(SelectorError, match=r"\\n"):  # newlines in the text are escaped: one line
        parse_selector("a ==\n")


@pytest.mark.parametrize("build", [
    lambda: Has("bad key"),
    lambda: Equals("/a", "x"),
    lambda: Equals("a", "both ' and \""),
    lambda: In("a", ["ok", "both ' and \""]),
    lambda: And([Has("a")]),
    lambda: Or([]),
])
def test_constructors_reject_what_cannot_be_written(build: Any) -> None:
    with pytest.raises(ValueError):
        build()


# ---------------------------------------------------------------------------------------------------------
# Property test: random selectors from a small grammar, checked against a reference evaluator.

KEYS = ["a", "b", "projectcalico.org/rack", "x-y_z.1"]
VALUES = ["", "x", "y", "xy", "r1", "it's", 'say "hi"']

Tree = tuple[Any, ...]

_comparisons = st.one_of(
    st.just(("all",)),
    st.tuples(st.just("has"), st.sampled_from(KEYS)),
    st.tuples(st.sampled_from(["==", "!=", "contains", "starts with", "ends with"]),
              st.sampled_from(KEYS), st.sampled_from(VALUES)),
    st.tuples(st.sampled_from(["in", "not in"]), st.sampled_from(KEYS),
              st.lists(st.sampled_from(VALUES), max_size=3)),
)

trees = st.recursive(
    _comparisons,
    lambda children: st.one_of(
        st.tuples(st.just("!"), children),
        st.tuples(st.just("()"), children),
        st.tuples(st.sampled_from(["&&", "||"]), children, children),
    ),
    max_leaves=12,
)

label_sets = st.lists(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES)), min_size=1, max_size=4)


def quote(value: str) -> str:
    return f"'{value}'" if '"' in value else f'"{value}"'


def render(tree: Tree, space: str) -> str:
    """Selector text for ``tree``, with only the parentheses that precedence needs (plus explicit "()")."""
    op = tree[0]
    if op == "all":
        return f"all({space})"
    if op == "has":
        return f"has({space}{tree[1]}{space})"
    if op in ("in", "not in"):
        return f"{tree[1]} {op} {{{space}{f',{space}'.join(quote(v) for v in tree[2])}{space}}}"
    if op == "!":
        inner = render(tree[1], space)
        return f"!{space}({inner})" if tree[1][0] in ("&&", "||") else f"!{space}{inner}"
    if op == "()":
        return f"({space}{render(tree[1], space)}{space})"
    if op in ("&&", "||"):
        left, right = render(tree[1], space), render(tree[2], space)
        if op == "&&":
            left = f"({left})" if tree[1][0] == "||" else left
            right = f"({right})" if tree[2][0] == "||" else right
        return f"{left}{space}{op}{space}{right}"
    if op in ("==", "!="):
        return f"{tree[1]}{space}{op}{space}{quote(tree[2])}"
    return f"{tree[1]} {op} {quote(tree[2])}"


def reference(tree: Tree, labels: dict[str, str]) -> bool:
    """Calico's semantics, computed straight from the generated structure."""
    op = tree[0]
    if op == "all":
        return True
    if op == "!":
        return not reference(tree[1], labels)
    if op == "()":
        return reference(tree[1], labels)
    if op == "&&":
        return reference(tree[1], labels) and reference(tree[2], labels)
    if op == "||":
        return reference(tree[1], labels) or reference(tree[2], labels)
    key = tree[1]
    if op == "has":
        return key in labels
    if op == "!=":
        return key not in labels or labels[key] != tree[2]
    if op == "not in":
        return key not in labels or labels[key] not in tree[2]
    if key not in labels:
        return False
    actual, value = labels[key], tree[2]
    if op in ("==", "in"):
        return actual == value if op == "==" else actual in value
    if op == "contains":
        return value in actual
    return actual.startswith(value) if op == "starts with" else actual.endswith(value)


@settings(max_examples=300, deadline=None)
@given(tree=trees, labels=label_sets, space=st.sampled_from(["", " ", " \t "]))
def test_random_selectors_round_trip_and_match_reference(
    tree: Tree, labels: list[dict[str, str]], space: str
) -> None:
    text = render(tree, space)
    selector = parse_selector(text)
    canonical = str(selector)
    assert parse_selector(canonical) == selector
    assert str(parse_selector(canonical)) == canonical
    for label_set in labels:
        assert selector.matches(label_set) is reference(tree, label_set), (text, label_set)
        assert parse_selector(canonical).matches(label_set) is reference(tree, label_set)
