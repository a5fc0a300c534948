"""Lab scenarios and the tests that boot guests (see scripts/lab)."""
