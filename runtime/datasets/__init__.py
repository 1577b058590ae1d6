"""The dataset tools behind `item features`, `item train` and `item eval`: manifests and
splits, perturbations, the feature store."""
