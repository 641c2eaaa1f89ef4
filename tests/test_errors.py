from rerank_core.errors import MAX_CHARS, error_summary


def test_one_line_names_the_type_and_keeps_the_first_line_only():
    error = RuntimeError("\n  InvalidCxxCompiler: no compiler\n  generated code follows\n")
    assert error_summary(error) == "RuntimeError: InvalidCxxCompiler: no compiler"
    assert error_summary(ValueError()) == "ValueError: "


def test_one_line_cuts_a_long_message():
    assert error_summary(OSError("x" * 1000)) == "OSError: " + "x" * MAX_CHARS
    assert error_summary(OSError("abcdef"), max_chars=3) == "OSError: abc"
