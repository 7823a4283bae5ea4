"""The toolkit's library, as a package (issue 31 moves the flat modules here)."""
