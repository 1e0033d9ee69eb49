"""Training: one loop (`vitkit.train.trainer.train`) for every objective (`vitkit.train.objective`), with exact
resume, torchrun, compilation and bf16-mixed. This package's root imports nothing, so that reading the
command line's option dataclasses (`vitkit.train.config`) does not load the training machinery."""
