"""Neural network models of KAD: the knowledge (text) encoder and the image-side models."""
