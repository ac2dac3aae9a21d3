"""The Space's serving layer: the engine (one model, the GPU job, scheduling), conversations and input checks, the
tabs' flows and rendering. `app.py` lays out the page on top of it; `ming/` below it never imports it."""
