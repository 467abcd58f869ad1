from els.cli import app

app()
