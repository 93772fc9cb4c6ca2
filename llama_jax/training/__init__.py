"""Training runtime every stage shares: the train state and optimizer, the `fit` loop, metric
logging and plots, and model averaging."""
