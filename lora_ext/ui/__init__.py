"""Gradio builders shared by the webui tab/panel and the standalone app. No torch at import time."""
