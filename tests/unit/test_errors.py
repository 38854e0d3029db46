"""pretrain/errors.py: bad input becomes one line on stderr and exit status 2; anything else stays a traceback."""

import pytest

from pretrain import errors


def test_input_error_is_one_line_and_exit_status_2(capsys):
    def main():
        print("working")
        raise errors.InputError("--vocab_size must be at least 261; pass a larger value")

    with pytest.raises(SystemExit) as caught:
        errors.run_main(main)
    assert caught.value.code == errors.EXIT_BAD_INPUT == 2
    assert capsys.readouterr() == ("working\n", "error: --vocab_size must be at least 261; pass a larger value\n")


def test_success_returns_and_other_errors_are_not_turned_into_bad_input(capsys):
    done = []
    assert errors.run_main(lambda: done.append(True)) is None
    assert done == [True] and capsys.readouterr() == ("", "")

    def broken():
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError, match="a bug"):
        errors.run_main(broken)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("error, line", [
    (OSError("404 Client Error\nfor url: https://huggingface.co/x"), "404 Client Error"),
    (ValueError("  \n  padded\nsecond"), "padded"),
    (TimeoutError(), "TimeoutError"),
    (RuntimeError("   "), "RuntimeError"),
])
def test_first_line(error, line):
    assert errors.first_line(error) == line


def test_exit_statuses_are_the_documented_ones():
    assert (errors.EXIT_BAD_INPUT, errors.EXIT_DIVERGED, errors.EXIT_WRITE_FAILED, errors.EXIT_PREEMPTED) == \
        (2, 3, 74, 75)
