"""CER arithmetic (no models)."""
import random

import pytest

from services.ocr.cer import cer, levenshtein, page_cer, page_text


def _slow(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a):
        cur = [i + 1]
        for j, cb in enumerate(b):
            cur.append(min(prev[j + 1] + 1, cur[j] + 1, prev[j] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_levenshtein_known_values():
    assert levenshtein("kitten", "sitting") == 3   # k->s, e->i, +g
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "") == 3
    assert levenshtein("same", "same") == 0
    assert levenshtein("é漢", "e漢x") == 2         # é->e, +x


def test_levenshtein_matches_the_textbook_recurrence():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab \n") for _ in range(rng.randint(0, 15)))
        b = "".join(rng.choice("ab \n") for _ in range(rng.randint(0, 15)))
        assert levenshtein(a, b) == _slow(a, b), (a, b)


def test_cer_arithmetic():
    assert cer("helo world", "hello world") == pytest.approx(1 / 11)   # one deletion / 11 chars
    assert cer("hello world!!", "hello world") == pytest.approx(2 / 11)
    assert cer("", "abcd") == 1.0                                      # 4 deletions / 4
    assert cer("abcdefgh", "ab") == 3.0                                # 6 insertions / 2: not clipped
    assert cer("", "") == 0.0 and cer("x", "") == 1.0


def _box(x0, y0, x1, y1):
    return (x0, y0, x1, y0, x1, y1, x0, y1)


def test_page_cer_orders_lines_before_comparing():
    truth = [("first line", _box(10, 10, 200, 30)), ("left", _box(10, 60, 60, 80)), ("right", _box(300, 61, 380, 81))]
    shuffled = [truth[2], truth[0], truth[1]]
    assert page_text(shuffled) == "first line\nleft\nright"
    assert page_cer(shuffled, truth) == 0.0
    # a missed line costs its characters and its separator: len("\nright") / len(truth text)
    assert page_cer(truth[:2], truth) == pytest.approx(6 / 21)   # "first line\nleft\nright" = 21 chars


def test_levenshtein_on_page_sized_strings():
    # page-sized inputs (speed is the benchmark's business, not a test's)
    a, b = "x" * 600, "y" * 550
    assert levenshtein(a, b) == 600          # 550 substitutions + 50 deletions
    assert levenshtein("kitten" * 100, "sitting" * 100) == 300   # 3 edits per repetition
