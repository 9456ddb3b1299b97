"""A real two-node launch on one machine: two network namespaces joined by a veth pair (private addresses, made and
removed here), one torchrun agent in each with c10d rendezvous on the first node's address, 1 process per node,
gloo over the veth pair; the run must equal the one-node 2-process run step for step, a node killed mid-run must end
the job on both nodes, and the relaunch must resume exactly. (slurmd is not run: this is
the torchrun equivalent of ``slurm/launch.sh`` on two nodes.) Skipped where network namespaces cannot be made
(not root, or no CAP_NET_ADMIN).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import REPO, TINY
from tests.faults import fault_env
from tests.trainutil import read_metrics, train_steps

pytestmark = pytest.mark.dist

STEPS = 6


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_nodes():
    """Namespaces ``(ns_a, ns_b)`` with ``10.77.<n>.1`` and ``10.77.<n>.2`` on the two ends of a veth pair."""
    tag = uuid.uuid4().hex[:6]
    ns = (f"igpt-a-{tag}", f"igpt-b-{tag}")
    veth = (f"va{tag}", f"vb{tag}")
    net = int(tag, 16) % 250 + 1
    made: list[str] = []
    try:
        for name in ns:
            if _ip("netns", "add", name).returncode != 0:
                pytest.skip("cannot create network namespaces here (ip netns add needs root / CAP_NET_ADMIN)")
            made.append(name)
        steps = [("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])]
        for i in (0, 1):
            steps += [("link", "set", veth[i], "netns", ns[i])]
        for step in steps:
            proc = _ip(*step)
            if proc.returncode:
                pytest.skip(f"cannot make a veth pair here: ip {' '.join(step)}: {proc.stderr.strip()}")
        for i in (0, 1):
            for step in (("addr", "add", f"10.77.{net}.{i + 1}/24", "dev", veth[i]), ("link", "set", veth[i], "up"),
                         ("link", "set", "lo", "up")):
                proc = _ip("netns", "exec", ns[i], "ip", *step)
                assert proc.returncode == 0, proc.stderr
        yield ns, veth, (f"10.77.{net}.1", f"10.77.{net}.2")
    finally:
        for name in made:
            _ip("netns", "del", name)  # removes the veth pair with it


def _args(data_dir: str, run_dir: str) -> list[str]:
    return ["+stage=pretrain", f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY, "trainer.global_batch_size=8",
            "trainer.micro_batch_size=4", f"trainer.max_steps={STEPS}", "trainer.eval_every=0", "trainer.ckpt_every=2",
            "trainer.progress=false", "trainer.sample_every_eval=false", "logger.wandb.mode=disabled",
            "optim.warmup_steps=1", "trainer.eval_batches=1", "strategy=ddp"]


def _two_node_run(two_nodes, args: list[str], port: int, env: dict, env_b: dict | None = None):
    """Start one torchrun agent per namespace (1 process each, c10d rendezvous on node A) and wait for both;
    returns ``[(returncode, output), ...]`` for nodes A and B."""
    (ns_a, ns_b), (va, vb), (addr_a, addr_b) = two_nodes
    agents = []
    for ns, dev, addr, host, extra in ((ns_a, va, addr_a, 1, {}), (ns_b, vb, addr_b, 0, env_b or {})):
        # is_host: node A's agent serves the rendezvous store, and local_addr: each agent's own address (torchrun
        # would look both up from the machine's hostname, whose address the namespaces cannot reach)
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint={addr_a}:{port}",
               f"--rdzv_conf=is_host={host}", f"--local_addr={addr}", f"--rdzv_id=igpt-{ns_a}-{port}",
               "igpt/train.py", *args]
        node_env = {**env, "GLOO_SOCKET_IFNAME": dev}
        node_env = fault_env(node_env, **extra) if extra else node_env  # test-only fault injection (tests/faults.py)
        agents.append(subprocess.Popen(cmd, cwd=REPO, env=node_env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for agent in agents:
        try:
            out, _ = agent.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for a in agents:
                a.kill()
            raise
        results.append((agent.returncode, out))
    return results


def test_two_nodes_in_network_namespaces_equal_one_node(prepared_text_dir, tmp_path, two_nodes):
    """2 nodes x 1 process equal 1 node x 2 processes step for step; a node killed mid-run (its process SIGKILLed
    after step 3) ends the job on both nodes with the root cause, and the relaunch (a requeue) resumes from the step-2
    checkpoint exactly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    one = str(tmp_path / "one")
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "igpt/train.py", *_args(prepared_text_dir, one)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=400)
    assert ref.returncode == 0, ref.stderr[-4000:]
    want = read_metrics(one)
    assert sorted(want) == list(range(1, STEPS + 1))

    two = str(tmp_path / "two")
    results = _two_node_run(two_nodes, _args(prepared_text_dir, two), 29531, env)
    assert all(rc == 0 for rc, _ in results), "\n".join(out[-3000:] for _, out in results)
    got = read_metrics(two)
    assert sorted(got) == sorted(want)
    for step in want:
        assert abs(got[step]["loss"] - want[step]["loss"]) <= 1e-6, (step, got[step]["loss"], want[step]["loss"])
    assert sorted(os.listdir(os.path.join(two, "logs"))) == ["rank0.log", "rank1.log"]

    # node B lost after step 3: both agents end, non-zero, and node B's names the signal
    lost = str(tmp_path / "lost")
    results = _two_node_run(two_nodes, _args(prepared_text_dir, lost), 29532, env, {"IGPT_FAULT_KILL_STEP": "3"})
    assert all(rc != 0 for rc, _ in results), [rc for rc, _ in results]
    assert "SIGKILL" in results[1][1], results[1][1][-3000:]
    assert train_steps(lost)[:2] == [1, 2]
    # the requeue: the same command on both nodes resumes from step 2 and ends equal to the uninterrupted run
    results = _two_node_run(two_nodes, _args(prepared_text_dir, lost), 29533, env)
    assert all(rc == 0 for rc, _ in results), "\n".join(out[-3000:] for _, out in results)
    assert "resumed from" in open(os.path.join(lost, "logs", "rank0.log")).read()
    got = read_metrics(lost)
    assert train_steps(lost)[-(STEPS - 2):] == list(range(3, STEPS + 1))
    for step in want:
        assert abs(got[step]["loss"] - want[step]["loss"]) <= 1e-6, (step, got[step]["loss"], want[step]["loss"])
