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


@main.command()
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The RuntimeConfig YAML (the operator mounts it from the job's ConfigMap).")
def aggregator(config_path: Path) -> None:
    """Run a job's aggregator: serve clients over gRPC, run the rounds, save the model."""
    from fedkube.federation.runtime import run_aggregator

    sys.exit(run_aggregator(config_path))


@main.command()
@click.option("--config", "config_path",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The RuntimeConfig YAML (the operator mounts it from the job's ConfigMap).")
@click.option("--index", type=click.IntRange(min=0),
              help="With --config: this client's index among all the job's clients (in a job "
                   "with sites, the sites' clients in order); it selects the site and data.")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, path_type=Path),
              help="A site's join bundle (`fedkube bundle JOB SITE`), or the folder its "
                   "Secret is mounted at, instead of --config: for a site outside the "
                   "aggregator's cluster.")
@click.option("--replica", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --bundle: which of the site's clients this is.")
@click.option("--data", "--data-dir", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The site's data directory (default: where its volume is mounted, "
                   "sites[].data.mountPath).")
@click.option("--tls-dir", type=click.Path(file_okay=False, path_type=Path),
              help="With --config: the folder with ca.crt, tls.crt and tls.key, instead of the "
                   "configuration's tls_dir.")
def client(config_path: Path | None, index: int | None, bundle_path: Path | None, replica: int,
           data_dir: Path | None, tls_dir: Path | None) -> None:
    """Run one client of a job: train on its data each round it is sampled.

    In a pod: --config and --index. On a site's own machine: --bundle and --data.
    """
    from fedkube.federation.runtime import run_bundle_client, run_client

    if bundle_path is not None:
        if config_path is not None or index is not None or tls_dir is not None:
            raise click.UsageError("--bundle carries the job and the certificate: drop "
                                   "--config, --index and --tls-dir")
        sys.exit(run_bundle_client(bundle_path, replica, data_dir))
    if config_path is None or index is None:
        raise click.UsageError("give --config and --index (a pod), or --bundle (a site "
                               "outside the cluster)")
    sys.exit(run_client(config_path, index, data_dir, tls_dir))


def _site_dirs(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> \
        dict[str, Path]:
    dirs = {}
    for value in values:
        site, sep, directory = value.partition("=")
        if not sep or not site or not directory:
            raise click.BadParameter(f"{value!r} is not SITE=DIR")
        dirs[site] = Path(directory)
    return dirs


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--rounds", type=click.IntRange(min=1), help="Override spec.rounds.")
@click.option("--clients", type=click.IntRange(min=1),
              help="Override spec.clients.replicas (minClients is lowered to fit).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder for the model, history and plot (default: runs/<job-name>).")
@click.option("--metrics-port", type=click.IntRange(1024, 65535),
              help="Serve the aggregator's /metrics and /status on this port (default: free).")
@click.option("--resume", is_flag=True,
              help="Continue after the run folder's last checkpointed round (e.g. after "
                   "Ctrl-C) instead of starting over.")
@click.option("--data", "data", multiple=True, metavar="SITE=DIR", callback=_site_dirs,
              help="A site's data directory here (repeatable); default: the path of the "
                   "site's hostPath volume.")
def run(job_file: Path, rounds: int | None, clients: int | None, output: Path | None,
        metrics_port: int | None, resume: bool, data: dict[str, Path]) -> None:
    """Run a FederatedJob on this machine: the aggregator and each client as processes."""
    from fedkube.local import run_local

    sys.exit(run_local(job_file, rounds=rounds, clients=clients, output=output,
                       metrics_port=metrics_port, resume=resume, data=data))


@main.command()
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
def render(files: tuple[Path, ...]) -> None:
    """Print the objects the operator would create for each FederatedJob, as a YAML stream.

    Keys and certificates are placeholders here; the operator issues real ones.
    """
    from fedkube.controller.render import render_files

    click.echo(render_files(files), nl=False)


@main.command()
@click.argument("job")
@click.argument("site")
@click.option("-n", "--namespace", help="The job's namespace (default: the kubeconfig's).")
@click.option("--address", help="host:port the site dials (default: the job's "
                                "spec.aggregator.service.externalAddress).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the bundle to this file (readable by you only) instead of standard "
                   "output.")
def bundle(job: str, site: str, namespace: str | None, address: str | None,
           output: Path | None) -> None:
    """Print SITE's join bundle for the FederatedJob JOB, from the cluster.

    The bundle (a Secret manifest holding the aggregator's address, the job's CA and the
    site's certificate and key) lets the site take part from outside the cluster:
    `fedkube client --bundle FILE --data DIR` on its machine, or `kubectl apply -f FILE` and a
    client-only FederatedJob in its own cluster. It holds a private key: send it securely.
    """
    from fedkube.api.runtime import ConfigurationError
    from fedkube.joining import fetch_bundle

    try:
        text = fetch_bundle(job, site, namespace, address)
    except ConfigurationError as error:
        console.print(f"[red]✗[/red] {escape(str(error))}", soft_wrap=True)
        sys.exit(1)
    if output is None:
        click.echo(text, nl=False)
        return
    output.touch(mode=0o600)
    output.write_text(text)
    console.print(f"wrote {escape(str(output))}: give it to site {escape(site)} securely")


@main.command()
@click.option("-n", "--namespace", "namespaces", multiple=True,
              help="Watch only this namespace (repeatable); all namespaces when omitted.")
@click.option("--all-namespaces", is_flag=True, help="Watch every namespace (the default).")
@click.option("--standalone", is_flag=True,
              help="No peering: reconcile at once, whatever else runs. For one replica "
                   "(development, tests); replicas of a Deployment meet in a peering object.")
@click.option("--peering-name", default="fedkube", show_default=True,
              help="The kopf (Cluster)KopfPeering the replicas meet in, so that one at a "
                   "time is active; created at start when missing.")
@click.option("--peering-lifetime", type=click.IntRange(5, 3600), default=15, show_default=True,
              help="Seconds a replica's peering record lives unrefreshed: how long the "
                   "standby replicas wait before taking over from one that died abruptly.")
@click.option("--liveness", default="http://0.0.0.0:8080/healthz", show_default=True,
              help="kopf liveness endpoint URL.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Port of the Prometheus /metrics endpoint.")
@click.option("--json-logs", is_flag=True, help="Log one JSON object per line.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def operator(namespaces: tuple[str, ...], all_namespaces: bool, standalone: bool,
             peering_name: str, peering_lifetime: int, liveness: str, metrics_port: int,
             json_logs: bool, verbose: bool) -> None:
    """Run the fedkube operator: FederatedJobs -> aggregator and client pods."""
    from fedkube.controller.operator import OperatorOptions, run_operator

    if all_namespaces and namespaces:
        raise click.UsageError("use --namespace or --all-namespaces, not both")
    options = OperatorOptions(namespaces=namespaces, standalone=standalone,
                              peering_name=peering_name, peering_lifetime=peering_lifetime,
                              liveness=liveness)
    sys.exit(run_operator(options, metrics_port, json_logs, verbose))


if __name__ == "__main__":
    main()
