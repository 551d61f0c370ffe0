"""An adversarial review of the Blanker's two newest rules (connector/delivery/_secrets.py,
commits adae42e and e4728fd): a line's end (raw, JSON-escaped once or twice, then an indent)
read between two characters of a secret past its first 8, and "ß" upper-cased as "SS".

What held is guarded by the properties below. Of what broke, four are fixed and guarded here
(a JSON-escaped tab indent, a line's end within the first 8 characters, a cut secret read
into the next line by one character, a line's end standing for a space of the secret) and
the quadratic read of a periodic secret is bounded by the read budget (the answer withheld);
two are left as strict xfails naming the defect: a line's end inside one character's escape,
and a secret ending in backslashes. Timings are in issue 17's note, never asserted."""

from __future__ import annotations

import json
import string
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.delivery._http import BODY_KEPT
from connector.delivery._secrets import BLANK, WITHHELD, Blanker

# a token's characters, backslashes, "n" and "r" among them (they spell an escaped line end)
TOKEN = "".join(c for c in string.printable if c not in string.whitespace + "~#")
AROUND = st.text(alphabet="~# ", max_size=12)
BREAKS = ["\n", "\r\n", "\n  ", "\n\t", "\r\n ", "\\n", "\\r\\n", "\\n  ", "\\\\n", "\\\\r\\\\n"]
# a line's end as a page has it, before the page is JSON-escaped as a whole (or not); a tab
# indent is left out: JSON-escaped, it is missed (a strict xfail below)
RAW_BREAKS = ["\n", "\r\n", "\n  ", "\r\n ", "\n        "]
ENCODINGS = [str, lambda s: json.dumps(s)[1:-1], lambda s: json.dumps(json.dumps(s))[3:-3]]
SECRET = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"  # a cut secret (16+ characters, no space)


def left(text: str, secret: str, size: int = 8) -> list[str]:
    """Every ``size``-character piece of ``secret`` that ``text`` still holds (any case)."""
    low, kept = secret.lower(), text.replace(BLANK, "\0").lower()
    return sorted(
        {low[i : i + size] for i in range(len(low) - size + 1) if low[i : i + size] in kept}
    )


def wrap_at(secret: str, cuts: set[int], breaks: list[str]) -> str:
    return "".join((breaks[i % len(breaks)] if i in cuts else "") + c for i, c in enumerate(secret))


# ---- what held: over-blanking ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=TOKEN, min_size=16, max_size=40),
    st.text(alphabet=TOKEN, min_size=16, max_size=40),
    st.sampled_from(RAW_BREAKS),
    st.text(alphabet="~# ", max_size=6),
    st.sampled_from(ENCODINGS),
)
def test_two_secrets_on_consecutive_lines_are_two_blanks_and_the_line_end_stays(
    one: str, two: str, wrap: str, indent: str, encode: object
) -> None:
    """Both whole (a line's end after a whole secret is never read: it ends the read)."""
    blank = Blanker.of({"x-one": one, "x-two": two})
    text = f"a={one}{wrap}{indent}b={two}"
    kept = f"a={BLANK}{wrap}{indent}b={BLANK}"
    assert blank(encode(text)) == encode(kept)  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=TOKEN + "\\nr", min_size=9, max_size=30).filter(
        lambda s: not s.endswith("\\") and "\\n" not in s and "\\r" not in s[8:]
    ),
    st.data(),
    st.sampled_from(RAW_BREAKS),
    AROUND,
    st.sampled_from(ENCODINGS),
)
def test_a_secret_of_backslashes_n_and_r_wrapped_is_blanked_and_the_next_line_kept(
    secret: str, data: st.DataObject, wrap: str, after: str, encode: object
) -> None:
    """A secret of backslashes, "n" and "r" is read every way at once and is blanked whole; a
    line's end after it stays (but for one ending in a backslash or holding one before an
    "n" or "r" past its head: a strict xfail below).
    The page is raw or JSON-escaped once or twice as a whole (a serializer escapes all of
    it: a raw backslash before an escaped line end is ambiguous, and read as the secret's)."""
    cuts = data.draw(st.sets(st.integers(min_value=8, max_value=len(secret) - 1), max_size=3))
    blank = Blanker.of({"x-api-key": secret})
    wrapped = wrap_at(secret, cuts, RAW_BREAKS)
    page, kept = f"<{wrapped}{wrap}~{after}", f"<{BLANK}{wrap}~{after}"
    assert blank(encode(page)) == encode(kept)  # type: ignore[operator]


@pytest.mark.parametrize("ending", ["\\", "\\r", "n", "r\\", "\\x"])
@pytest.mark.parametrize("wrap", RAW_BREAKS)
@pytest.mark.parametrize("encode", ENCODINGS, ids=["raw", "json", "json-twice"])
def test_a_secret_ending_in_what_may_begin_an_escape_keeps_the_line_after_it(
    ending: str, wrap: str, encode: object
) -> None:
    secret = "a1b2c3d4e5f6g7" + ending
    blank = Blanker.of({"x-api-key": secret})
    for rest in ("next line", "n\\r x", "\\n"):
        page = f"key {secret}{wrap}{rest}"
        assert blank(encode(page)) == encode(f"key {BLANK}{wrap}{rest}")  # type: ignore[operator]


def test_a_line_end_and_indent_alone_are_never_blanked_and_a_head_alone_is_left() -> None:
    blank = Blanker.of({"authorization": f"Bearer {SECRET}"})
    lines = "ok\n    \\n\\r\\n  "
    assert blank(lines) == lines
    # a line's end within the first 8 characters is read too (they find the secret)
    assert blank(lines + "sk_live\n  _4eC39HqL") == lines + BLANK
    assert blank("  sk_live_4e\n    next") == f"  {BLANK}\n    next"


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=8, max_value=len(SECRET)),
    st.sampled_from(BREAKS),
    st.text(alphabet=string.ascii_letters + string.digits + " .:", min_size=1, max_size=20),
)
def test_a_cut_secret_ending_its_line_keeps_any_next_line_not_starting_like_its_rest(
    shown: int, wrap: str, line: str
) -> None:
    """The rule of e4728fd, over any next line whose first character (after the indent) is
    not the secret's next one (when it is: a strict xfail below)."""
    rest = SECRET[shown : shown + 1].lower()
    if line.lstrip(" ")[:1].lower() == rest and rest:
        line = "." + line
    blank = Blanker.of({"authorization": f"Bearer {SECRET}"})
    text = f"key {SECRET[:shown]}{wrap}{line}"
    assert blank(text) == f"key {BLANK}{wrap}{line}"


# ---- what held: under-blanking -----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=9, max_value=40), st.sampled_from([0, 2, 4, 8]), AROUND)
def test_a_token_wrapped_by_textwrap_at_any_width_past_its_head_keeps_none_of_it(
    width: int, indent: int, before: str
) -> None:
    token = SECRET + "Xy7_" * 10
    blank = Blanker.of({"authorization": f"Bearer {token}"})
    page = textwrap.fill(token, width, subsequent_indent=" " * indent)
    assert blank(before + page) == before + BLANK
    assert blank(json.dumps(page)) == json.dumps(BLANK)
    assert blank(json.dumps(json.dumps(page))) == json.dumps(json.dumps(BLANK))


# ---- what held: "ß" ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="aßs1-", min_size=8, max_size=20), AROUND, AROUND)
def test_a_sharp_s_secret_upper_cased_is_blanked_in_json_twice_percent_and_capital_sharp_s(
    secret: str, before: str, after: str
) -> None:
    """A Latin-1 header value (the only non-ASCII a header carries) with "ß" upper-cased by a
    service: "SS" in any escape that leaves ASCII letters alone, and "ẞ" (U+1E9E)."""
    blank = Blanker.of({"x-api-key": secret})
    upper = secret.upper()
    for shown in (
        upper,
        json.dumps(json.dumps(secret))[3:-3].upper(),
        upper.replace("-", "%2D"),
        secret.replace("ß", "ẞ"),
        secret.replace("ß", "ss"),  # casefold()
    ):
        assert blank(before + shown + after) == before + BLANK + after


def test_a_sharp_s_secret_wrapped_between_its_characters_is_blanked() -> None:
    secret = "key-1234-straße-xyz"
    blank = Blanker.of({"x-api-key": secret})
    assert blank("KEY-1234-STRA\nSSE-XYZ") == BLANK
    assert blank("KEY-1234-STRASS\\nE-XYZ") == BLANK


def test_ss_in_a_secret_does_not_blank_a_plain_word_and_ascii_stays_ascii() -> None:
    blank = Blanker.of({"x-api-key": "pass-ss-1234"})  # under 16: never cut
    assert blank("the pass-ßß-1234 rule") == "the pass-ßß-1234 rule"
    assert blank("the PASS-SS-1234 rule") == f"the {BLANK} rule"


# ---- what held: kept() ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=BODY_KEPT - 200, max_value=2 * BODY_KEPT),
    st.sets(st.integers(min_value=8, max_value=len(SECRET) - 1), max_size=4),
    st.sampled_from(RAW_BREAKS),
    st.sampled_from([str.upper, *ENCODINGS]),
)
def test_kept_leaves_no_prefix_of_a_secret_wrapped_or_not_wherever_it_falls(
    at: int, cuts: set[int], wrap: str, form: object
) -> None:
    blank = Blanker.of({"authorization": f"Bearer {SECRET}", "x-key": "Short-Key-9"})
    echo = form(wrap_at(SECRET, cuts, [wrap]))  # type: ignore[operator]
    text = "x" * at + echo + " Short-Key-9 " + echo + "y" * 9000
    kept = blank.kept(text)
    assert len(kept) <= BODY_KEPT
    assert left(kept, SECRET) == []
    assert "short-key-9" not in kept.lower()


# ---- what broke -------------------------------------------------------------------------------


@pytest.mark.parametrize("fold", ["\n\t", "\r\n\t"])
def test_a_wrapped_secret_with_a_tab_indent_quoted_in_json_is_blanked_whole(fold: str) -> None:
    blank = Blanker.of({"authorization": f"Bearer {SECRET}"})
    page = SECRET[:12] + fold + SECRET[12:]
    assert blank(page) == BLANK  # raw: held
    assert blank(json.dumps(page)) == json.dumps(BLANK)


@pytest.mark.parametrize("at", range(1, 8))
def test_a_secret_wrapped_within_its_first_eight_characters_is_blanked(at: int) -> None:
    blank = Blanker.of({"authorization": f"Bearer {SECRET}"})
    assert left(blank(f"bad key: {SECRET[:at]}\n{SECRET[at:]}"), SECRET) == []


def test_a_cut_secret_ending_its_line_keeps_a_next_line_that_starts_like_its_rest() -> None:
    blank = Blanker.of({"authorization": f"Bearer {SECRET}"})
    # SECRET[12] is "9": a masked echo of 12 characters, then a line that starts with a 9
    text = f"key {SECRET[:12]}\n9 attempts left"
    assert blank(text) == f"key {BLANK}\n9 attempts left"


@pytest.mark.parametrize(
    ("secret", "echo"),
    [
        ("Token token=abcdef0123456789, user=ops", "Token token=abcdef0123456789,\nuser=ops"),
        ("Token token=abcdef0123456789, user=ops", "Token token=abcdef0123456789,\n  user=ops"),
        ("abcdefghij klmnopq", "abcdefghij\n klmnopq"),  # fold -w: the space on the next line
    ],
    ids=["textwrap", "textwrap-indent", "fold"],
)
def test_a_secret_with_a_space_wrapped_at_its_space_is_blanked(secret: str, echo: str) -> None:
    blank = Blanker.of({"authorization": secret})
    assert blank(f"got: {echo}") == f"got: {BLANK}"


@pytest.mark.xfail(
    strict=True,
    reason="a line's end is read only between two characters' forms, never inside one: a "
    "percent escape (or 'SS' for 'ß') broken by a wrap at a fixed width is missed",
)
@pytest.mark.parametrize(
    ("secret", "echo"),
    [
        ("pass/word+key/0123", "pass%2Fword%2Bkey%2\nF0123"),
        ("pass/word+key/0123", "pass%2Fword%2Bkey%\n2F0123"),
        ("pass/word+key/straße", "PASS/WORD+KEY/STRAS\nSE"),
    ],
    ids=["percent-2-F", "percent-%-2F", "sharp-s"],
)
def test_a_secret_wrapped_inside_one_characters_escape_is_blanked(secret: str, echo: str) -> None:
    assert Blanker.of({"x-api-key": secret})(f"<{echo}>") == f"<{BLANK}>"


@pytest.mark.xfail(
    strict=True,
    reason="a secret with a backslash before its end is read furthest with mixed forms: a "
    "backslash as its escaped pair or an escaped line end, the next line's backslash as raw; "
    "the blank takes the line's end (since adae42e) or half an escape (before it too)",
)
@pytest.mark.parametrize(
    ("secret", "encode"),
    [
        ("a1b2c3d4e5f6g7\\\\", str),  # raw, the next line starting with a backslash
        ("a1b2c3d4e5f6g7\\n", ENCODINGS[1]),  # JSON: a backslash and an "n" end it
        ("a1b2c3d4e5f6g7\\\\", ENCODINGS[1]),  # JSON: two backslashes end it (also before)
    ],
    ids=["raw-two-backslashes", "json-backslash-n", "json-two-backslashes"],
)
def test_a_secret_ending_in_backslashes_keeps_the_line_end_after_it(
    secret: str, encode: object
) -> None:
    blank = Blanker.of({"x-api-key": secret})
    page, kept = f"key {secret}\n\\next", f"key {BLANK}\n\\next"
    assert blank(encode(page)) == encode(kept)  # type: ignore[operator]


# ---- slow inputs: outcomes only ---------------------------------------------------------------


def test_a_periodic_value_with_a_space_against_wrapped_lines_of_its_period_is_left() -> None:
    """A secret not cut (a space in it) whose head recurs: every head reads on over the
    lines' ends until the text ends (quadratic: 0.01 s -> 5.7 s for 4 KiB against 8 KiB,
    before the read budget). Kept small here, within the budget: the outcome only."""
    blank = Blanker.of({"x-key": "abcdefgh" * 16 + " z"})
    text = "abcdefgh\n" * 40
    assert blank(text) == text
    assert blank(text[:-1] + " z") == "abcdefgh\n" * 24 + BLANK  # the last 16 periods


def test_a_text_that_would_take_more_than_the_read_budget_is_withheld_whole() -> None:
    """The same at a size past READ_BUDGET: the whole answer is withheld, in bounded time,
    rather than read for seconds of the event loop's time (or kept unread)."""
    blank = Blanker.of({"x-key": "abcdefgh" * 512 + " z"})
    assert blank("abcdefgh\n" * 910) == WITHHELD
    assert blank.kept("abcdefgh\n" * 910) == WITHHELD
