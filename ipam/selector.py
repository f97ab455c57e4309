"""Project Calico label selectors: a hand-written tokenizer, recursive-descent parser and evaluator.

Supported subset of Calico's selector grammar (``&&`` binds tighter than ``||``; whitespace is allowed
between any two tokens; an empty or all-whitespace selector means ``all()``)::

    selector   := [ or ]
    or         := and { "||" and }
    and        := unary { "&&" unary }
    unary      := "!" unary | primary
    primary    := "(" or ")" | "all()" | "global()" | "has(" key ")" | key comparison
    comparison := "==" string | "!=" string | "in" set | "not" "in" set
                | "contains" string | "starts" "with" string | "ends" "with" string
    set        := "{" [ string { "," string } ] "}"
    string     := "'" any chars but ' "'" | '"' any chars but " '"'   (no escapes, as in Calico)

Keys are Kubernetes label keys (``projectcalico.org/rack``): an optional lowercase DNS-subdomain prefix
and ``/``, then a name of at most 63 characters from ``[A-Za-z0-9._-]`` that starts and ends with a letter
or digit. This is stricter than Calico, which takes any run of ``[A-Za-z0-9._/-]``; a key Kubernetes would
refuse can never match a node label, so it is reported as a typo. The words ``has``, ``all``, ``global``,
``in``, ``not``, ``contains``, ``starts``, ``ends`` and ``with`` are only special where the grammar expects
them, so they also work as keys.

As in Calico, ``k != 'v'`` and ``k not in {...}`` are true when the label ``k`` is absent, while every other
comparison on an absent label is false. ``global()`` parses and matches everything, but
:attr:`Selector.is_global` lets callers (such as IP pool validation) reject it.
"""

from __future__ import annotations

import functools
import json
import string
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, NoReturn

__all__ = [
    "All",
    "And",
    "Contains",
    "EndsWith",
    "Equals",
    "Global",
    "Has",
    "In",
    "Not",
    "NotEquals",
    "NotIn",
    "Or",
    "Selector",
    "SelectorError",
    "StartsWith",
    "parse_selector",
    "selector_matches",
]


class SelectorError(ValueError):
    """A syntax error; the one-line message names the text, the 0-based position and what was expected."""

    def __init__(self, text: str, position: int, expected: str, found: str | None = None) -> None:
        self.text = text
        self.position = position
        self.expected = expected
        self.found = found
        tail = f", found {found}" if found is not None else ""
        quoted = json.dumps(text)  # escapes quotes and newlines, so the message stays on one line
        super().__init__(f"invalid selector {quoted}: expected {expected} at position {position}{tail}")


# ---------------------------------------------------------------------------------------------------------
# Label keys and quoting


_ALNUM = frozenset(string.ascii_letters + string.digits)
_NAME_CHARS = _ALNUM | frozenset("._-")
_KEY_CHARS = _NAME_CHARS | frozenset("/")
_DNS_ALNUM = frozenset(string.ascii_lowercase + string.digits)
_DNS_CHARS = _DNS_ALNUM | frozenset("-")


def _key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid Kubernetes label key, or None if it is."""
    prefix, slash, name = key.rpartition("/")
    if "/" in prefix:
        return "at most one '/' is allowed"
    if slash and not prefix:
        return "the prefix before '/' is empty"
    if not name:
        return "the name is empty"
    if len(name) > 63:
        return "the name is longer than 63 characters"
    if not set(name) <= _NAME_CHARS or name[0] not in _ALNUM or name[-1] not in _ALNUM:
        return "the name must be letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
    if len(prefix) > 253:
        return "the prefix is longer than 253 characters"
    if prefix:
        for part in prefix.split("."):
            if not part or not set(part) <= _DNS_CHARS or not {part[0], part[-1]} <= _DNS_ALNUM:
                return "the prefix must be a lowercase DNS subdomain"
    return None


def _check_key(key: str) -> None:
    problem = _key_problem(key)
    if problem is not None:
        raise ValueError(f"invalid label key {key!r}: {problem}")


def _quote(value: str) -> str:
    """Quote a value the way the canonical form does: double quotes unless the value contains one."""
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise ValueError(f"value {value!r} contains both quote characters and cannot be written in a selector")


# ---------------------------------------------------------------------------------------------------------
# The syntax tree


class Selector(ABC):
    """A parsed selector: an immutable, hashable tree whose ``str`` is canonical and re-parses to equal it."""

    @abstractmethod
    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a resource carrying ``labels`` is selected."""

    @abstractmethod
    def __str__(self) -> str: ...

    @property
    def is_global(self) -> bool:
        """True if ``global()`` appears anywhere in the selector."""
        return False


@dataclass(frozen=True)
class All(Selector):
    """``all()``: matches everything."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        return True

    def __str__(self) -> str:
        return "all()"


@dataclass(frozen=True)
class Global(Selector):
    """``global()``: matches everything, but callers may reject it through :attr:`is_global`."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        return True

    def __str__(self) -> str:
        return "global()"

    @property
    def is_global(self) -> bool:
        return True


@dataclass(frozen=True)
class Has(Selector):
    """``has(key)``: the label is present, whatever its value."""

    key: str

    def __post_init__(self) -> None:
        _check_key(self.key)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels

    def __str__(self) -> str:
        return f"has({self.key})"


@dataclass(frozen=True)
class _Compare(Selector):
    """A ``key <operator> "value"`` comparison; false on an absent label unless a subclass says otherwise."""

    key: str
    value: str
    OPERATOR: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check_key(self.key)
        _quote(self.value)

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.key)
        return actual is not None and self._test(actual)

    def _test(self, actual: str) -> bool:
        raise NotImplementedError

    def __str__(self) -> str:
        return f"{self.key} {self.OPERATOR} {_quote(self.value)}"


@dataclass(frozen=True)
class Equals(_Compare):
    OPERATOR = "=="

    def _test(self, actual: str) -> bool:
        return actual == self.value


@dataclass(frozen=True)
class NotEquals(_Compare):
    """``key != "value"``: also true when the label is absent."""

    OPERATOR = "!="

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key) != self.value


@dataclass(frozen=True)
class Contains(_Compare):
    OPERATOR = "contains"

    def _test(self, actual: str) -> bool:
        return self.value in actual


@dataclass(frozen=True)
class StartsWith(_Compare):
    OPERATOR = "starts with"

    def _test(self, actual: str) -> bool:
        return actual.startswith(self.value)


@dataclass(frozen=True)
class EndsWith(_Compare):
    OPERATOR = "ends with"

    def _test(self, actual: str) -> bool:
        return actual.endswith(self.value)


@dataclass(frozen=True)
class In(Selector):
    """``key in {"a", "b"}``: the label is present with one of the values (any iterable is accepted)."""

    key: str
    values: frozenset[str]
    OPERATOR: ClassVar[str] = "in"

    def __post_init__(self) -> None:
        _check_key(self.key)
        object.__setattr__(self, "values", frozenset(self.values))
        for value in self.values:
            _quote(value)

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.key)
        return actual is not None and actual in self.values

    def __str__(self) -> str:
        return f"{self.key} {self.OPERATOR} {{{', '.join(_quote(v) for v in sorted(self.values))}}}"


@dataclass(frozen=True)
class NotIn(In):
    """``key not in {"a", "b"}``: also true when the label is absent."""

    OPERATOR = "not in"

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.key)
        return actual is None or actual not in self.values


@dataclass(frozen=True)
class Not(Selector):
    """``!operand``."""

    operand: Selector

    def matches(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.matches(labels)

    def __str__(self) -> str:
        if isinstance(self.operand, All | Global | Has | Not):
            return f"!{self.operand}"
        return f"!({self.operand})"

    @property
    def is_global(self) -> bool:
        return self.operand.is_global


@dataclass(frozen=True)
class _Junction(Selector):
    """Two or more operands joined by one operator; nested junctions are kept (and printed) as written."""

    operands: tuple[Selector, ...]
    OPERATOR: ClassVar[str] = ""
    _PARENTHESIZE: ClassVar[tuple[type[Selector], ...]] = ()

    def __init__(self, operands: Iterable[Selector]) -> None:
        object.__setattr__(self, "operands", tuple(operands))
        if len(self.operands) < 2:
            raise ValueError(f"{type(self).__name__} needs at least two operands")

    def __str__(self) -> str:
        parts = (f"({op})" if isinstance(op, self._PARENTHESIZE) else str(op) for op in self.operands)
        return f" {self.OPERATOR} ".join(parts)

    @property
    def is_global(self) -> bool:
        return any(op.is_global for op in self.operands)


@dataclass(frozen=True, init=False)
class And(_Junction):
    OPERATOR = "&&"

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(op.matches(labels) for op in self.operands)


@dataclass(frozen=True, init=False)
class Or(_Junction):
    OPERATOR = "||"

    def matches(self, labels: Mapping[str, str]) -> bool:
        return any(op.matches(labels) for op in self.operands)


And._PARENTHESIZE = (And, Or)
Or._PARENTHESIZE = (Or,)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


class _Token(NamedTuple):
    kind: str  # "ident", "string", "punct" or "end"
    value: str  # the identifier, the string's contents (without quotes) or the punctuation
    position: int
    raw: str  # the source text of the token


_PUNCTUATION = ("&&", "||", "==", "!=", "!", "(", ")", "{", "}", ",")


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "'\"":
            end = text.find(char, i + 1)
            if end < 0:
                raise SelectorError(text, i, f"a closing {char} for the string", "the end of the selector")
            tokens.append(_Token("string", text[i + 1 : end], i, text[i : end + 1]))
            i = end + 1
        elif char in _KEY_CHARS:
            end = i
            while end < n and text[end] in _KEY_CHARS:
                end += 1
            tokens.append(_Token("ident", text[i:end], i, text[i:end]))
            i = end
        else:
            punct = next((p for p in _PUNCTUATION if text.startswith(p, i)), None)
            if punct is None:
                expected = f"'{char * 2}'" if char in "&|=" else "a label key, quoted string or operator"
                raise SelectorError(text, i, expected, repr(char))
            tokens.append(_Token("punct", punct, i, punct))
            i += len(punct)
    tokens.append(_Token("end", "", n, ""))
    return tokens


# ---------------------------------------------------------------------------------------------------------
# Parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "end":
            self.index += 1
        return token

    def fail(self, expected: str, token: _Token | None = None) -> NoReturn:
        token = token or self.peek()
        found = None if token.kind == "end" else repr(token.raw)
        raise SelectorError(self.text, token.position, expected, found)

    def accept(self, punct: str) -> bool:
        token = self.peek()
        if token.kind == "punct" and token.value == punct:
            self.index += 1
            return True
        return False

    def expect(self, punct: str, expected: str | None = None) -> None:
        if not self.accept(punct):
            self.fail(expected or f"'{punct}'")

    def expect_word(self, word: str) -> None:
        token = self.peek()
        if token.kind != "ident" or token.value != word:
            self.fail(f"'{word}'")
        self.index += 1

    def parse(self) -> Selector:
        if self.peek().kind == "end":
            return All()
        selector = self.parse_or()
        if self.peek().kind != "end":
            self.fail("'&&', '||' or the end of the selector")
        return selector

    def parse_or(self) -> Selector:
        operands = [self.parse_and()]
        while self.accept("||"):
            operands.append(self.parse_and())
        return operands[0] if len(operands) == 1 else Or(operands)

    def parse_and(self) -> Selector:
        operands = [self.parse_unary()]
        while self.accept("&&"):
            operands.append(self.parse_unary())
        return operands[0] if len(operands) == 1 else And(operands)

    def parse_unary(self) -> Selector:
        if self.accept("!"):
            return Not(self.parse_unary())
        return self.parse_primary()

    def parse_primary(self) -> Selector:
        if self.accept("("):
            selector = self.parse_or()
            self.expect(")", "'&&', '||' or ')'")
            return selector
        token = self.peek()
        if token.kind != "ident":
            self.fail("a label key, all(), global(), has(...), '!' or '('")
        self.index += 1
        if self.accept("("):
            return self.parse_call(token)
        return self.parse_comparison(self.key(token))

    def parse_call(self, name: _Token) -> Selector:
        if name.value == "has":
            token = self.peek()
            if token.kind != "ident":
                self.fail("a label key")
            self.index += 1
            key = self.key(token)
            self.expect(")")
            return Has(key)
        if name.value == "all":
            self.expect(")")
            return All()
        if name.value == "global":
            self.expect(")")
            return Global()
        self.fail("a function named has, all or global", name)

    def key(self, token: _Token) -> str:
        problem = _key_problem(token.value)
        if problem is not None:
            self.fail(f"a valid label key ({problem})", token)
        return token.value

    def parse_comparison(self, key: str) -> Selector:
        if self.accept("=="):
            return Equals(key, self.string())
        if self.accept("!="):
            return NotEquals(key, self.string())
        word = self.peek().value if self.peek().kind == "ident" else None
        if word == "in":
            self.index += 1
            return In(key, self.string_set())
        if word == "not":
            self.index += 1
            self.expect_word("in")
            return NotIn(key, self.string_set())
        if word == "contains":
            self.index += 1
            return Contains(key, self.string())
        if word in ("starts", "ends"):
            self.index += 1
            self.expect_word("with")
            return (StartsWith if word == "starts" else EndsWith)(key, self.string())
        self.fail("an operator (==, !=, in, not in, contains, starts with, ends with)")

    def string(self) -> str:
        token = self.peek()
        if token.kind != "string":
            self.fail("a quoted string")
        self.index += 1
        return token.value

    def string_set(self) -> frozenset[str]:
        self.expect("{")
        values: set[str] = set()
        if self.accept("}"):
            return frozenset()
        while True:
            values.add(self.string())
            if self.accept("}"):
                return frozenset(values)
            self.expect(",", "',' or '}'")


# ---------------------------------------------------------------------------------------------------------
# Public entry points


@functools.lru_cache(maxsize=1024)
def parse_selector(text: str) -> Selector:
    """Parse a Calico selector; raises :class:`SelectorError` on a syntax error. Results are cached."""
    return _Parser(text).parse()


def selector_matches(text: str, labels: Mapping[str, str]) -> bool:
    """Parse ``text`` (cached) and evaluate it against ``labels``."""
    return parse_selector(text).matches(labels)
