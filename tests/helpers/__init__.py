"""Helpers shared by test modules: model variables without a compiled init, the shared-data locator, replayable
kill seeds."""
