"""`python -m retrieval.cli ...` runs `retr ...`."""

from retrieval.cli import app

app()
