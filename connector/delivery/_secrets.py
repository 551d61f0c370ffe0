"""Blanking the secrets a destination sends out of the answers it keeps.

A service that echoes a request's headers or address in its error page (a 401 quoting the
key it refused, a 404 page naming the hook's secret path) would put them in the dead letters
and the attempts' stored answers, where the console shows them behind Reveal. A
:class:`Blanker` knows what one destination sends (its header values, its URL's credentials,
path and query) and replaces each occurrence in an answer's text, in any letter case (``ß``
upper-cased as ``SS`` too), in the forms a body quotes it in and wrapped over lines, with
``[secret]``; an answer that would take too long to read for them is withheld whole. Every
destination builds one and applies it before an answer's text is classified or kept
(:class:`~connector.destinations._vendor.VendorClient` for the vendors,
:class:`~connector.destinations.http.HttpSink` for contract 4).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import html.entities
import json
import re
from collections.abc import Collection, Mapping
from typing import TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from connector.delivery._http import BODY_KEPT
from connector.errors import DeliveryError

E = TypeVar("E", bound=DeliveryError)

BLANK = "[secret]"
WITHHELD = "[answer withheld: it repeats the start of a secret too often to be checked]"
READ_BUDGET = 50_000  # steps of reading from where secrets may start, per text
WRAP_TAIL = 4  # characters read past a line's end before a secret cut short may end there
# headers that describe the request rather than authorise it: blanking their values (a media
# type, a client's name) would garble every answer that names one
NOT_SECRET = frozenset(
    {"accept", "accept-encoding", "accept-language", "content-type", "user-agent"}
)
MIN_SECRET = 8  # shorter values are left: blanking a common word would garble every answer
MIN_PASSWORD = 6  # a URL's password, said to be one: but "X" (an API key as user) is none
# a header secret this long is blanked quoted cut short too, from its first MIN_SECRET characters
MIN_CUT = 16


class Blanker:
    """Replaces the secrets of one destination's requests in an answer's text (callable).
    Its repr says how many secrets it looks for, never one of them."""

    def __init__(self, secrets: list[Secret]) -> None:
        self._secrets = secrets

    @classmethod
    def of(
        cls, headers: Mapping[str, str], url: str | None = None, *, public: Collection[str] = ()
    ) -> Blanker:
        """What requests with ``headers`` (but :data:`NOT_SECRET` and ``public`` names, which
        a vendor says carry no secret) to ``url`` (``None``: a vendor's API, whose address
        is no secret) must not get back into the store."""
        left = NOT_SECRET | {name.lower() for name in public}
        sent = {name: value for name, value in headers.items() if name.lower() not in left}
        return cls(secrets_of(sent, url))

    def __call__(self, text: str) -> str:
        """``text`` with every occurrence of a secret, overlaps merged, blanked; the whole of
        it withheld (:data:`WITHHELD`) when reading it would cost more than
        :data:`READ_BUDGET` steps (a text repeating a secret's start thousands of times,
        against secrets that repeat themselves): never seconds of the event loop's time,
        never a secret kept."""
        spans: list[tuple[int, int]] = []
        budget = [READ_BUDGET]
        try:
            for secret in self._secrets:
                spans += secret.spans(text, budget)
        except _OverBudget:
            return WITHHELD
        if not spans:
            return text
        merged: list[list[int]] = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1]:  # overlapping or touching: one blank
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        out, at = [], 0
        for start, end in merged:
            out += [text[at:start], BLANK]
            at = end
        out.append(text[at:])
        return "".join(out)

    def kept(self, text: str) -> str:
        """What is kept of an answer's ``text``: its first :data:`BODY_KEPT` characters, the
        secrets blanked before the cut (a secret cut at the limit leaves no prefix). Only the
        start is read: an error page of megabytes costs no more than one of kilobytes."""
        return self(text[: 2 * BODY_KEPT])[:BODY_KEPT]

    def error(self, exc: E) -> E:
        """``exc`` with its message and kept answer blanked (returned for ``raise``)."""
        exc.args = tuple(self(a) if isinstance(a, str) else a for a in exc.args)
        if exc.body is not None:
            exc.body = self(exc.body)
        return exc

    def __repr__(self) -> str:
        return f"Blanker({len(self._secrets)} secrets)"


def secrets_of(headers: Mapping[str, str], url: str | None) -> list[Secret]:
    """What an answer must not carry back into the store, each matched case-blind:

    - the header values, whole and the token after a scheme word (``Bearer X``), and for
      ``Basic`` the pair it encodes; a header secret of :data:`MIN_CUT` characters or more
      also when quoted cut short (a masked or truncated echo), from its first
      :data:`MIN_SECRET` characters;
    - the URL's user and password (the password from :data:`MIN_PASSWORD` characters) and
      the Basic credential made of them;
    - the URL's path and query whole, its query values, and its path segments that hold a
      digit (a Zapier or n8n hook's path is its secret);

    each character as sent or in any escape a body may quote it in, mixed as a serializer
    mixes them (:func:`_char`). Values under :data:`MIN_SECRET` characters are left, but a
    password.
    """
    values: list[str] = []
    always: list[str] = []
    for value in headers.values():
        values += [value, value.strip()]  # a service may echo it trimmed
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if token:
            values.append(token)
            if scheme.lower() == "basic":
                with contextlib.suppress(ValueError):
                    padded = token + "=" * (-len(token) % 4)  # sent without its padding too
                    pair = base64.b64decode(padded, validate=True).decode()
                    user, _, password = pair.partition(":")
                    values += [pair, user]  # an API key is often sent as the user
                    always.append(password)
    # a key or token, not a whole "Scheme token" value (its scheme word would start every cut)
    cut = {v for v in values if len(v) >= MIN_CUT and not any(c.isspace() for c in v)}
    if url is not None:
        parts = urlsplit(url)
        if parts.username is not None:
            user, password = parts.username, parts.password or ""
            pair = f"{unquote(user)}:{unquote(password)}"
            values += [user, unquote(user), base64.b64encode(pair.encode()).decode()]
            always += [password, unquote(password)]
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        values += [target, unquote(target)]
        values += [parts.query, unquote(parts.query)]  # a bare token too (``?abc123...``)
        values += [v for _, v in parse_qsl(parts.query)]
        values += [unquote(s) for s in parts.path.split("/") if any(c.isdigit() for c in s)]
    kept = {v for v in values if len(v) >= MIN_SECRET and v.strip()}
    kept |= {v for v in always if len(v) >= MIN_PASSWORD and v.strip()}
    return [Secret(value, value in cut) for value in sorted(kept, key=len, reverse=True)]


class Secret:
    """One secret's occurrences in a text, each character in any of its forms (:func:`_forms`,
    as a serializer mixes them). A ``cut`` secret also where it is quoted cut short, from its
    first :data:`MIN_SECRET` characters.

    A pattern of the first characters finds where one may start; from there every way of
    reading the text as the secret's characters is followed at once (the set of positions
    after each character), so no form taken early can hide a match (``\\\\`` is one
    escaped backslash or two raw ones) and no run of backslashes makes it try every split
    of the run, as a regular expression of the whole secret would (exponentially)."""

    __slots__ = ("_chars", "_cut", "_head", "_spaces")

    def __init__(self, value: str, cut: bool) -> None:
        # a line may end between any two of the first characters too
        head = f"(?:{_WRAP_PATTERN})?".join(_char(c) for c in value[:MIN_SECRET])
        self._head = re.compile(head, re.IGNORECASE)
        self._chars = [_forms(c) for c in value]
        self._spaces = [c == " " for c in value]
        self._cut = cut

    def spans(self, text: str, budget: list[int] | None = None) -> list[tuple[int, int]]:
        """Where the secret is in ``text``; ``budget``: the characters all reads may still
        take, spent here (:class:`_OverBudget` once spent)."""
        found: list[tuple[int, int]] = []
        at = 0
        while (head := self._head.search(text, at)) is not None:
            start = head.start()
            end = self._read(text, start, budget)
            if end is None:
                at = start + 1
                continue
            found.append((start, end))
            at = max(end, start + 1)
        return found

    def _read(self, text: str, start: int, budget: list[int] | None = None) -> int | None:
        """Where the secret read from ``start`` ends (the furthest reading; a cut secret once
        its first :data:`MIN_SECRET` characters are read), or None.

        A line may end between two characters, or stand for a space (:func:`_wrapped`): a
        long token wrapped to a page's width. A line's end is read only with characters of
        the secret after it: a cut secret ends before one unless :data:`WRAP_TAIL` of them
        follow it (a masked echo ending its line is not read into the next line)."""
        # each reading's position, and how many characters it read since a line's end
        ends = {start: MIN_SECRET}
        safe: int | None = None  # where a cut secret may end
        for count, (any_form, forms) in enumerate(self._chars):
            if budget is not None:
                budget[0] -= len(ends)
                if budget[0] < 0:
                    raise _OverBudget
            wrapped = _wrapped(text, ends) if count else {}
            # where a reading is at already, it has read more since a break
            tried = {**wrapped, **ends} if wrapped else ends
            after: dict[int, int] = {}
            for at, since in tried.items():
                if forms is None:  # its forms never begin one another: one reading at most
                    matches = [m] if (m := any_form.match(text, at)) else []
                else:
                    matches = [m for form in forms if (m := form.match(text, at))]
                for m in matches:
                    after[m.end()] = max(after.get(m.end(), 0), since + 1)
            if self._spaces[count]:  # a space the wrapper turned into a line's end
                for end in wrapped:
                    after.setdefault(end, 0)
            if not after:
                return safe if self._cut and count >= MIN_SECRET else None
            ends = after
            if count + 1 >= MIN_SECRET:
                tails = [at for at, since in ends.items() if since >= WRAP_TAIL]
                if tails:
                    safe = max(safe or 0, *tails)
        return max(ends)

    def __repr__(self) -> str:
        return "Secret(...)"


# a line's end, raw or JSON-escaped (once or twice), and the next line's indent, raw or
# JSON-escaped: a token wrapped over lines (a plain-text page, a log quoted in JSON)
_BREAK = re.compile(r"\r?\n|\\r\\n|\\n|\\\\r\\\\n|\\\\n")
_INDENT = re.compile(r"[ \t]|\\t|\\\\t")
_WRAP_PATTERN = rf"(?:{_BREAK.pattern})(?:{_INDENT.pattern})*"
_BREAK_FIRST = ("\r", "\n", "\\")  # what one begins with: most positions are tried no further


def _breaks(text: str, at: int) -> list[int]:
    """Where a line's end at ``at`` and each part of the next line's indent end (a wrapper
    may have kept a space of the secret in the indent): empty when no line ends there."""
    if not text.startswith(_BREAK_FIRST, at) or (m := _BREAK.match(text, at)) is None:
        return []
    found = [end := m.end()]
    while (indent := _INDENT.match(text, end)) is not None:
        found.append(end := indent.end())
    return found


def _wrapped(text: str, ends: dict[int, int]) -> dict[int, int]:
    """The readings of ``ends`` that go on past a line's end (none read since)."""
    return {end: 0 for at in ends for end in _breaks(text, at)}


class _OverBudget(Exception):
    """Reading a text for secrets would cost more than :data:`READ_BUDGET`."""


@functools.lru_cache(maxsize=1024)
def _forms(c: str) -> tuple[re.Pattern[str], tuple[re.Pattern[str], ...] | None]:
    """A pattern of any form of ``c`` (:func:`_char`) and, where one form may begin another
    (``\\`` and ``\\\\``, ``&`` and ``&amp;``, ``%`` and ``%25``: a text then reads as the
    character in more than one way), each form as its own pattern; else None."""
    literals, patterns = _spellings(c)
    folded = {x.lower() for x in literals}
    ambiguous = any(b.startswith(a) for a in folded for b in folded | {"&#"} if a != b)
    forms = {re.escape(x) for x in literals} | patterns
    return re.compile(_char(c), re.IGNORECASE), (
        tuple(re.compile(f, re.IGNORECASE) for f in forms) if ambiguous else None
    )


def _char(c: str) -> str:
    """A pattern of one character of a secret as a body may quote it: as it is, or escaped
    by JSON (``\\/``, ``\\u002B``: .NET escapes ``+``, PHP ``/``), by JSON twice (an error
    quoted as a string inside another, as a gateway passes one on), percent-encoding (its
    UTF-8 bytes, once or twice), HTML (named, decimal or hexadecimal), or form encoding
    (``+`` for space); in either letter case inside an escape too (``\\u00c9`` for ``é``);
    a character beyond ASCII also as the replacement character its Latin-1 byte becomes
    when an answer is read as UTF-8."""
    if c.isascii() and c.isalnum():
        return c
    literals, patterns = _spellings(c)
    forms = {re.escape(f) for f in literals} | patterns
    return "(?:" + "|".join(sorted(forms, key=lambda f: (-len(f), f))) + ")"


def _spellings(c: str) -> tuple[set[str], set[str]]:
    """The forms of ``c`` (:func:`_char`): literal texts, and patterns (numeric entities)."""
    if c.isascii() and c.isalnum():
        return {c}, set()
    literals: set[str] = set()
    patterns: set[str] = set()
    for v in {c, c.upper(), c.lower()}:
        if len(v) != 1:  # "ß" upper-cased is "SS": a text of its own (either case)
            literals.add(v)
            continue
        point = ord(v)
        escaped = {f"\\u{point:04x}", "\\" + v}
        if point > 0xFFFF:  # JSON writes it as a surrogate pair
            units = v.encode("utf-16-be")
            escaped.add("".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in (0, 2)))
        twice = {json.dumps(e)[1:-1] for e in escaped}
        literals |= {v, html.escape(v)} | escaped | twice | {t.replace("/", "\\/") for t in twice}
        percent = "".join(f"%{b:02x}" for b in v.encode())
        literals |= {percent, percent.replace("%", "%25")}
        literals |= {f"&{name}" for name in _ENTITIES.get(v, ())}
        patterns |= {f"&#0*{point};", f"&#x0*{point:x};"}
    if not c.isascii():  # echoed in Latin-1 (as sent), read as UTF-8: a replacement character
        literals.add("\ufffd")
    if c == " ":
        literals.add("+")
    return literals, patterns


def _entities() -> dict[str, list[str]]:
    """Each character's HTML named references (``&eacute;``, HTML5's ``&sol;``), with their
    semicolon: ``&amp`` alone is a legacy form no serializer writes."""
    found: dict[str, list[str]] = {}
    for name, value in html.entities.html5.items():
        if len(value) == 1 and name.endswith(";"):
            found.setdefault(value, []).append(name)
    return found


_ENTITIES = _entities()
