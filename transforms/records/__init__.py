"""Records: one input row to a prepared pair. Image values decoded with their guards, boxes read and turned into pixels, and the pure score math (mask, composite, area normalisation)."""
