"""Training loops and learning-rate schedules for both KAD training stages."""
