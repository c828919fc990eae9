"""Tests of transforms.messages: one-line text, quoted values, the capped RecordError."""

from __future__ import annotations

from lpips_pipe.transforms.messages import MAX_MESSAGE_CHARS, RecordError, one_line, quote_value


def test_one_line_folds_white_space_and_never_cuts_without_a_limit():
    assert one_line("  a\n\tb   c \n") == "a b c"
    assert one_line(ValueError("x\ny")) == "x y"
    assert one_line("w " * 1000) == " ".join(["w"] * 1000)


def test_one_line_cut_keeps_at_most_the_limit_or_cut_to_characters_then_dots():
    text = "x" * 301
    assert one_line("x" * 300, 300, cut_to=297) == "x" * 300
    assert one_line(text, 300, cut_to=297) == "x" * 297 + "..."  # 300 characters in all
    assert one_line(text, 300) == "x" * 300 + "..."


def test_one_line_first_line_is_the_first_non_empty_line_stripped():
    assert one_line("\n  \n  first  \nsecond", first_line=True) == "first"
    assert one_line("", first_line=True) == one_line(" \n ", first_line=True) == ""
    assert one_line("y" * 130 + "\nz", 120, first_line=True) == "y" * 120 + "..."


def test_quote_value_and_record_error_stay_short():
    assert quote_value("x" * 500).endswith("xxx' (500 chars)") and len(quote_value("x" * 500)) < 100
    for long_path in ("/data/" + "deep/" * 40 + "frame-0001.png", "/data/" + "d" * 61 + "/pipe.png"):  # 214, 76
        shown = quote_value(long_path, 72)  # the start and the file name stay, and the closing quote
        assert shown.startswith("'/data/d") and shown.endswith(f"{long_path[-8:]}' ({len(long_path)} chars)"), shown
    assert quote_value(b"b" * 100).endswith("... (100 bytes)")
    assert quote_value([1, 2]) == "[1, 2]"
    error = RecordError("read", "X", "m" * 100_000)
    assert str(error) == error.message and len(error.message) < MAX_MESSAGE_CHARS + 40
    assert (error.stage, error.error_type) == ("read", "X")
