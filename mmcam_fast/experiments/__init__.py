"""The study of the README: MinMaxCAM against CAM and its ablations on Tiny-ImageNet-5 (CPU)."""
