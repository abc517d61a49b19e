"""Ray side of mlctl: start or join Ray, run the DeepSpeed workers under Ray Train, watch the run."""
