"""The stock configs (the YAML files here), installed inside the package as ``mlctl.configs`` so
that ``-c NAME`` finds them wherever mlctl is installed (mlctl/stock.py)."""
