"""Entity and presence extraction from report texts, and the label matrix built from it."""
