from els.cli.main import app

app()
