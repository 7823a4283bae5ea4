"""The toolkit's library package (the flat modules move here: issue 31)."""
