"""Running cov3d's CLI in-process and reading its one-line errors, for the adversarial test modules."""

from typer.testing import CliRunner

from cov3d.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result, *fragments) -> str:
    """The one 'Error:' line of a failed command, holding every fragment; no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
