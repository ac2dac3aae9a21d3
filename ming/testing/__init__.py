"""Test scaffolding that the offline demo also uses: the tiny random-weight checkpoint in the release's layout, its
stand-in tokenizer, and random stand-ins for files that only ship with the real weights."""
