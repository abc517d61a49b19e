"""The `mlctl` command (launcher/cli.py) and the Ray side of mlctl: start or join Ray, run the
DeepSpeed workers under Ray Train, watch the run. It imports ``mlctl``; ``mlctl`` never imports it."""
