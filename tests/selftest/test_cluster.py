"""The cluster as plain records: EFA from a fake sysfs, nodes from a fake ``ray.nodes()``, hardware ids.

Baselines are keyed by ``ClusterShape.hardware_id``, so its spelling is pinned here: a change
to it silently orphans every stored baseline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdperf.cluster import ClusterShape, NodeInfo, detect_efa, nodes_from_ray_state

pytestmark = pytest.mark.selftest


# -- detect_efa --------------------------------------------------------------------------------

def add_ib_device(sysfs, name: str, driver: str | None) -> None:
    """``class/infiniband/<name>/device/driver`` -> ``bus/pci/drivers/<driver>``, as the kernel lays it out."""
    device = sysfs / "class" / "infiniband" / name / "device"
    device.mkdir(parents=True)
    if driver is not None:
        target = sysfs / "bus" / "pci" / "drivers" / driver
        target.mkdir(parents=True, exist_ok=True)
        (device / "driver").symlink_to(target)


def test_detect_efa_finds_efa_devices(tmp_path):
    add_ib_device(tmp_path, "rdmap0s31", "efa")
    add_ib_device(tmp_path, "rdmap16s27", "efa")
    assert detect_efa(tmp_path) == ["rdmap0s31", "rdmap16s27"]


def test_detect_efa_ignores_other_rdma_devices(tmp_path):
    add_ib_device(tmp_path, "mlx5_0", "mlx5_core")
    add_ib_device(tmp_path, "rdmap0s31", "efa")
    add_ib_device(tmp_path, "unbound0", None)  # a device with no driver bound
    assert detect_efa(tmp_path) == ["rdmap0s31"]


def test_detect_efa_mellanox_only(tmp_path):
    add_ib_device(tmp_path, "mlx5_0", "mlx5_core")
    assert detect_efa(tmp_path) == []


def test_detect_efa_without_infiniband_folder(tmp_path):
    (tmp_path / "class").mkdir()
    assert detect_efa(tmp_path) == []
    assert detect_efa(tmp_path / "no-such-sysfs") == []


# -- nodes_from_ray_state ----------------------------------------------------------------------

def ray_node(node_id: str, ip: str, resources: dict, alive: bool = True) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": alive, "Resources": resources}


RAY_NODES = [
    ray_node("w2", "10.0.0.12", {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0, "memory": 1.5 * 2**40,
                                 "node:10.0.0.12": 1.0}),
    ray_node("dead", "10.0.0.13", {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0}, alive=False),
    ray_node("w1", "10.0.0.11", {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0, "memory": 1.5 * 2**40}),
    ray_node("head", "10.0.0.20", {"CPU": 8.0, "memory": 16 * 2**30, "node:__internal_head__": 1.0,
                                   "node:10.0.0.20": 1.0}),
]


def test_nodes_from_ray_state_drops_dead_nodes_and_puts_the_head_first():
    nodes = nodes_from_ray_state(RAY_NODES)
    assert [n.node_id for n in nodes] == ["head", "w1", "w2"]


def test_nodes_from_ray_state_fields():
    head, w1, _ = nodes_from_ray_state(RAY_NODES, efa={"w1": 32})
    assert head == NodeInfo(node_id="head", ip="10.0.0.20", gpus=0, cpus=8.0, gpu_model=None, efa_devices=0,
                            is_head=True, memory_gb=16.0)
    assert (w1.gpus, w1.cpus, w1.gpu_model, w1.is_head) == (8, 192.0, "H100", False)
    assert w1.memory_gb == 1536.0
    assert w1.efa_devices == 32 and w1.has_efa


def test_nodes_from_ray_state_lowercase_alive_key():
    nodes = nodes_from_ray_state([{"NodeID": "a", "NodeManagerAddress": "10.0.0.1", "alive": True,
                                   "Resources": {"CPU": 4.0}}])
    assert [n.node_id for n in nodes] == ["a"]
    assert nodes[0].gpus == 0 and nodes[0].gpu_model is None


# -- hardware_id -------------------------------------------------------------------------------

def h100(i: int, gpus: int = 8, efa: int = 0) -> NodeInfo:
    return NodeInfo(node_id=f"n{i}", ip=f"10.0.0.{i}", gpus=gpus, cpus=192.0, gpu_model="H100", efa_devices=efa)


CPU_MODEL = "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"


def test_hardware_id_cpu():
    shape = ClusterShape(nodes=[NodeInfo(node_id="local", ip="127.0.0.1", cpus=8.0, is_head=True)],
                         cpu_model=CPU_MODEL, cpu_cores=2)
    assert shape.hardware_id == "cpu-2c-intel-r-xeon-r-platinum-8375c-cpu-2-90ghz"
    assert ClusterShape(nodes=[], cpu_cores=4).hardware_id == "cpu-4c-unknown"


def test_hardware_id_one_x8_h100():
    assert ClusterShape(nodes=[h100(1)]).hardware_id == "h100-x8"


def test_hardware_id_two_x8_h100_with_efa():
    assert ClusterShape(nodes=[h100(1, efa=32), h100(2, efa=32)]).hardware_id == "h100-x8-n2-efa"


def test_hardware_id_efa_on_some_nodes_only_is_not_efa():
    assert ClusterShape(nodes=[h100(1, efa=32), h100(2)]).hardware_id == "h100-x8-n2"


def test_hardware_id_uneven_nodes():
    assert ClusterShape(nodes=[h100(1, 8), h100(2, 4)]).hardware_id == "h100-x4+8-n2"


def test_hardware_id_ignores_hostnames_and_the_cpu_only_head():
    head = NodeInfo(node_id="head", ip="10.9.9.9", cpus=8.0, is_head=True)
    a = ClusterShape(nodes=[head, h100(1, efa=32), h100(2, efa=32)], cpu_model="x", cpu_cores=2)
    b = ClusterShape(nodes=[h100(7, efa=16), h100(8, efa=16)], cpu_model="y", cpu_cores=64)
    assert a.hardware_id == b.hardware_id == "h100-x8-n2-efa"


# -- libfabric's view of EFA (fi_info) --------------------------------------------------------
# fi_info's output format with a p5.48xlarge's shape (32 EFA devices, each once per endpoint type,
# beside the shm and tcp providers); written to that format, not captured on a p5.

def test_parse_fi_info_p5_shaped():
    from pdperf.cluster import parse_fi_info

    text = (Path(__file__).parent / "data" / "efa" / "fi_info-p5-shaped.txt").read_text()
    domains = parse_fi_info(text)
    assert len(domains) == 64 and domains[0] == "rdmap79s0-rdm" and "shm" not in domains
    assert parse_fi_info(text, "shm") == ["shm"]
    assert parse_fi_info(text, "tcp") == ["ens32"]  # "tcp;ofi_rxm": the core provider counts
    assert parse_fi_info("") == []


def test_p5_shaped_sysfs_tree(tmp_path):
    for b in range(79, 79 + 32):
        add_ib_device(tmp_path, f"rdmap{b}s0", "efa")
    assert len(detect_efa(tmp_path)) == 32


def test_libfabric_view_travels_with_the_node():
    (node,) = [n for n in nodes_from_ray_state(RAY_NODES, efa={"w1": 32}, efa_libfabric={"w1": 0}) if n.node_id == "w1"]
    assert node.has_efa and node.efa_libfabric_domains == 0
    assert all(n.efa_libfabric_domains is None for n in nodes_from_ray_state(RAY_NODES))
