import sys

try:
    from orchestrator.cli import command
except ModuleNotFoundError as exc:  # this Python lacks a package the command line needs: say which, in one line
    from orchestrator.environment import missing_package_line

    line = missing_package_line(exc)
    if line is None:
        raise
    sys.stderr.write(f"error: {line}\n")
    sys.exit(1)

command()
