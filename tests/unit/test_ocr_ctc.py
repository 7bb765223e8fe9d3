"""CTC greedy decoding and character sets (no models)."""
import numpy as np
import pytest

from services.ocr.ctc import BLANK, ctc_greedy_decode, load_charset

CHARSET = [BLANK, "a", "b", "c", " "]


def _probs(indices, p=0.9):
    out = np.full((len(indices), len(CHARSET)), (1 - p) / (len(CHARSET) - 1), np.float32)
    out[np.arange(len(indices)), indices] = p
    return out


def test_repeats_collapse_and_blanks_separate():
    # a a _ a b b _ _ c  ->  "aabc": repeats merge, a blank between two a's keeps both
    text, conf = ctc_greedy_decode(_probs([1, 1, 0, 1, 2, 2, 0, 0, 3]), CHARSET)
    assert text == "aabc"
    assert conf == pytest.approx(0.9)


def test_confidence_is_mean_of_kept_steps():
    probs = _probs([1, 2])
    probs[0, 1], probs[1, 2] = 0.6, 0.8
    assert ctc_greedy_decode(probs, CHARSET)[1] == pytest.approx(0.7)   # (0.6 + 0.8) / 2


def test_all_blank_is_empty_with_zero_confidence():
    assert ctc_greedy_decode(_probs([0, 0, 0]), CHARSET) == ("", 0.0)


def test_space_class_decodes_to_space():
    assert ctc_greedy_decode(_probs([1, 4, 2]), CHARSET)[0] == "a b"


def test_wrong_class_count_is_an_error():
    with pytest.raises(ValueError):
        ctc_greedy_decode(np.zeros((3, 7)), CHARSET)


def test_load_charset_handles_crlf_and_appends_space(tmp_path):
    p = tmp_path / "dict.txt"
    p.write_bytes(b"a\r\nb\r\n\xe3\x80\x80\r\n")           # a, b, ideographic space
    assert load_charset(p) == [BLANK, "a", "b", "\u3000", " "]
    assert load_charset(p, use_space_char=False) == [BLANK, "a", "b", "\u3000"]
