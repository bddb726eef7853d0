"""What a run prints at its end, checked the same way on the console, in run.log and in a submitted job's logs."""

from __future__ import annotations

PROGRESS = ("step ", "  validation: ", "  test (step ")


def assert_ends_in_order(text: str, steps: int) -> None:
    """The run's last step, its last validation and its test line, in that order, then the `finished:` summary,
    and no progress line after it."""
    lines = text.splitlines()
    ends = [i for i, line in enumerate(lines) if line.startswith("finished: ")]
    assert len(ends) == 1, text[-3000:]
    progress = [line for line in lines[: ends[0]] if line.startswith(PROGRESS)]
    assert len(progress) >= 3, text[-3000:]
    last_step, last_validation, test = progress[-3:]
    assert last_step.startswith(f"step {steps}/{steps} "), text[-3000:]
    assert last_validation.startswith("  validation: ") and test.startswith("  test (step "), text[-3000:]
    # The summary repeats the test line; the progress display's own lines must all be above it.
    assert not [line for line in lines[ends[0] :] if line.startswith(PROGRESS[:2])], text[-3000:]
