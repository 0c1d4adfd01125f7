"""The typer CLI: one module per command group, joined in main.py with add_typer."""
