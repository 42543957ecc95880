"""Tracking: what sisa tells MLflow. Runs and metrics are an observer of the operations (`observer`,
`runs`); the ensemble as a registered, verified pyfunc model (`pyfunc`, `digest`, `registry`); plots."""
