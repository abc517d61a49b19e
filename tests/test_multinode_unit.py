"""Quick checks of the multi-node rules (no Ray): endpoint addresses and the elastic worker range."""

from __future__ import annotations

import pytest

from mlctl.config import ConfigError, load_config
from mlctl.metrics import endpoint_addresses, is_loopback


@pytest.mark.parametrize(
    ("bind", "node_ip", "expected"),
    [
        # A loopback bind on a networked node: serve and advertise the node address instead.
        ("127.0.0.1", "10.231.57.11", ("10.231.57.11", "10.231.57.11")),
        ("localhost", "10.231.57.11", ("10.231.57.11", "10.231.57.11")),
        ("::1", "10.231.57.11", ("10.231.57.11", "10.231.57.11")),
        # Single machine (embedded Ray on loopback): stays on loopback.
        ("127.0.0.1", "127.0.0.1", ("127.0.0.1", "127.0.0.1")),
        # Wildcard: every interface, advertised as the node address.
        ("0.0.0.0", "10.231.57.11", ("0.0.0.0", "10.231.57.11")),
        ("::", "10.231.57.11", ("::", "10.231.57.11")),
        # An explicit address is taken as given.
        ("10.231.57.99", "10.231.57.11", ("10.231.57.99", "10.231.57.99")),
    ],
)
def test_endpoint_addresses(bind, node_ip, expected):
    assert endpoint_addresses(bind, node_ip) == expected


def test_a_networked_node_never_advertises_loopback():
    for bind in ("127.0.0.1", "127.0.1.1", "localhost", "::1", "0.0.0.0", "", "::"):
        _, host = endpoint_addresses(bind, "10.231.57.10")
        assert not is_loopback(host), (bind, host)


def test_num_workers_range():
    cfg = load_config(None, ["ray.num_workers=[1,4]"])
    assert (cfg.ray.min_workers, cfg.ray.max_workers) == (1, 4)
    cfg = load_config(None, ["ray.num_workers=3"])
    assert (cfg.ray.min_workers, cfg.ray.max_workers) == (3, 3)
    for bad in ("[2,1]", "[0,2]", "[1,2,3]", "[1]"):
        with pytest.raises(ConfigError, match=r"ray.num_workers as a range must be \[min, max\]"):
            load_config(None, [f"ray.num_workers={bad}"])


def test_elastic_range_needs_zero_stage_0(tiny_shards, tiny_model_dir):
    from launcher.preflight import preflight

    model = f"model.name_or_path={tiny_model_dir}"
    cfg = load_config(
        None, [model, f"data.shards={tiny_shards}", "ray.num_workers=[1,2]", "deepspeed.zero_stage=1"]
    )
    with pytest.raises(
        ValueError, match=r"ray.num_workers=\[1, 2\] \(elastic\) needs deepspeed.zero_stage=0"
    ):
        preflight(cfg)
    cfg = load_config(
        None, [model, f"data.shards={tiny_shards}", "ray.num_workers=[1,2]", "deepspeed.zero_stage=0"]
    )
    assert preflight(cfg).ray.num_workers == [1, 2]
