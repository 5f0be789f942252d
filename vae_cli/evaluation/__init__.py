"""Numbers from a trained model: pure metric functions, the evaluation pass, classification of files and
the `--reject` gate."""
