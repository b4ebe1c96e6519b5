"""The ``fedkube`` command.

Each subcommand imports what it needs when it runs, so that ``fedkube validate`` stays fast
and the operator's commands work without torch installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from fedkube import __version__

console = Console(stderr=True, highlight=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fedkube")
def main() -> None:
    """fedkube: federated learning jobs on Kubernetes, or on this machine."""


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the CRD to this file instead of standard output.")
def crd(output: Path | None) -> None:
    """Print the FederatedJob CustomResourceDefinition generated from the API models."""
    from fedkube.api.crd import render_crd_yaml

    text = render_crd_yaml()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        console.print(f"wrote {output}")


@main.command()
@click.argument("files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check FederatedJob manifests offline, as the API server and the operator would.

    Prints every problem with its file, line, field path and a hint; exits 1 on any.
    """
    from fedkube.api.validation import validate_file

    failed = False
    for path in files:
        problems, jobs = validate_file(path)
        if problems:
            failed = True
            for problem in problems:
                hint = f" [dim]({escape(problem.hint)})[/dim]" if problem.hint else ""
                where = escape(problem.source)
                if problem.path:
                    where += f": [bold]{escape(problem.path)}[/bold]"
                console.print(f"[red]✗[/red] {where}: {escape(problem.message)}{hint}",
                              soft_wrap=True)
        else:
            console.print(f"[green]✓[/green] {escape(str(path))}: {jobs} FederatedJob(s) valid",
                          soft_wrap=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
