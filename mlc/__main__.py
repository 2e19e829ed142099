from mlc.cli.main import cli

cli()
