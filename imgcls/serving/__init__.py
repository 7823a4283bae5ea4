"""serve.py's library: a trained or exported model behind an HTTP API and a drag-and-drop page."""
