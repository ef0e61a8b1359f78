"""Training: the train state and step, the optimizer and loss, the loop with its metrics, workdir lock and history, and evaluation."""
