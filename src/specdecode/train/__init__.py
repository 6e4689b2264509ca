"""Training draft heads: data, target features, the training-time test and the command."""
