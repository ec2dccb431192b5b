"""One module per API: health.py (/, /health, /metrics), models.py, completions.py, chat.py."""
