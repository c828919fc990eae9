"""The model: weights (sources, safe loading, the only importer of lpips), the batched scorer and its LPIPS head, and masked_lpips for one pair."""
