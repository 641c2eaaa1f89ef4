from rerank_core.errors import MAX_CHARS, one_line


def test_one_line_names_the_type_and_keeps_the_first_line_only():
    error = RuntimeError("\n  InvalidCxxCompiler: no compiler\n  generated code follows\n")
    assert one_line(error) == "RuntimeError: InvalidCxxCompiler: no compiler"
    assert one_line(ValueError()) == "ValueError: "


def test_one_line_cuts_a_long_message():
    assert one_line(OSError("x" * 1000)) == "OSError: " + "x" * MAX_CHARS
    assert one_line(OSError("abcdef"), max_chars=3) == "OSError: abc"
