"""Rules on finished scores, no Beam: filter thresholds and tiers (filtering), calibration from human labels (calibration)."""
