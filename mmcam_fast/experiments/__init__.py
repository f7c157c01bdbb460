"""The studies of docs/results.md: MinMaxCAM against CAM and its ablations on Tiny ImageNet (CPU)."""
