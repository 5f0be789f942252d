"""Running a training job: the run folder and its lock, the loop, the resumable state, torchrun/DDP,
the final phase and promotion."""
