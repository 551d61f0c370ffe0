"""The revisions, in order (``down_revision`` links them)."""
