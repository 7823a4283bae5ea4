"""The image-classification toolkit as a package (the flat modules move here: issue 31)."""
