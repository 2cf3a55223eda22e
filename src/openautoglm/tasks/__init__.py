"""Task endpoints' prompt building: a task specification → chat messages, an output constraint and a parser."""
